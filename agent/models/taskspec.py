"""The manifest's task fields: how an image becomes an input tensor (``preprocess``), what a model's raw
outputs mean (``head``), and how a stateful model keeps one state per client stream (``streams``).

Kept apart from :mod:`agent.models.catalog` so the catalogue stays about files and verification; these are
the pydantic models it embeds in :class:`~agent.models.catalog.ModelEntry` and
:class:`~agent.models.catalog.TensorSpec`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Preprocess(BaseModel):
    """How a JPEG or PNG sent as ``{"image": {"b64": ...}}`` becomes this input's ``[1, H, W, C]`` tensor.

    Pixels are decoded as 0..255, resized to the tensor's H x W, put in ``color`` order, normalised
    (``mean``/``std`` per channel, or linearly onto ``range``), then cast to the tensor's dtype
    (quantized with its quantization if it has one).
    """

    model_config = ConfigDict(extra="forbid")

    resize: Literal["stretch", "letterbox", "crop"] = Field(
        "stretch",
        description="stretch: to H x W whatever the aspect; letterbox: fit inside, pad the rest with pad_value; "
        "crop: the largest centred region of the tensor's aspect, then resize",
    )
    color: Literal["rgb", "bgr", "grayscale"] = "rgb"
    mean: list[float] | None = Field(None, description="per channel (or one for all), on 0..255 pixel values")
    std: list[float] | None = Field(None, description="per channel (or one for all); with mean: (x - mean) / std")
    range: tuple[float, float] | None = Field(None, description="maps 0..255 linearly onto [low, high]")
    pad_value: float = Field(0.0, ge=0, le=255, description="letterbox padding, as a 0..255 pixel value")

    @model_validator(mode="after")
    def _one_normalisation(self) -> Preprocess:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together")
        if self.mean is not None and self.range is not None:
            raise ValueError("normalise with mean/std or with range, not both")
        if self.std is not None and any(value == 0 for value in self.std):
            raise ValueError("std must not be 0")
        return self


class StreamSettings(BaseModel):
    """One interpreter state per (client, stream) for a model that keeps state between invocations."""

    model_config = ConfigDict(extra="forbid")

    max_streams: int = Field(16, ge=1, le=4096, description="streams held at once; a new one beyond is refused")
    idle_timeout_s: float = Field(300.0, gt=0, description="a stream unused this long is dropped (its state lost)")


class ClassificationHead(BaseModel):
    """The first output scores the ``labels``: replies carry ``top`` (label, score), highest first."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["classification"]


class AnchorConfig(BaseModel):
    """MediaPipe's SsdAnchorsCalculator options: one anchor grid per layer, ``strides[layer]`` pixels apart."""

    model_config = ConfigDict(extra="forbid")

    num_layers: int = Field(ge=1)
    strides: list[int] = Field(min_length=1)
    min_scale: float = Field(gt=0)
    max_scale: float = Field(gt=0)
    input_height: int = Field(gt=0)
    input_width: int = Field(gt=0)
    anchor_offset_x: float = 0.5
    anchor_offset_y: float = 0.5
    aspect_ratios: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    interpolated_scale_aspect_ratio: float = 1.0
    fixed_anchor_size: bool = True
    reduce_boxes_in_lowest_layer: bool = False

    @model_validator(mode="after")
    def _one_stride_per_layer(self) -> AnchorConfig:
        if len(self.strides) != self.num_layers:
            raise ValueError(f"{self.num_layers} layers need {self.num_layers} strides, not {len(self.strides)}")
        return self


class DetectionHead(BaseModel):
    """Raw detector outputs turned into ``detections: [{label, score, box, keypoints?}]`` (box in 0..1).

    ``tflite_postprocess``: a model ending in ``TFLite_Detection_PostProcess`` (outputs boxes as
    ``[ymin, xmin, ymax, xmax]``, classes, scores, count, in that order). ``ssd_anchors``: raw SSD
    outputs (``regressors`` ``[1, anchors, 4 + 2 * keypoints]`` and ``scores`` ``[1, anchors, classes]``)
    decoded against generated anchors, then non-maximum suppression.
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["detection"]
    format: Literal["tflite_postprocess", "ssd_anchors"]
    score_threshold: float = Field(0.5, ge=0, le=1, description="default of the request's score_threshold")
    max_detections: int = Field(100, ge=1, le=10_000, description="default (and ceiling) of max_detections")
    label_offset: int = Field(0, description="added to a class index before looking up labels")
    # ssd_anchors only:
    anchors: AnchorConfig | None = None
    box_scale: tuple[float, float, float, float] | None = Field(
        None, description="x, y, w, h scales of the regressors; default: the input's width, height, width, height"
    )
    num_keypoints: int = Field(0, ge=0)
    sigmoid_scores: bool = True
    score_clipping: float | None = Field(None, gt=0, description="raw scores clipped to +/- this before the sigmoid")
    iou_threshold: float = Field(0.3, gt=0, le=1, description="non-maximum suppression overlap")
    nms: Literal["hard", "weighted"] = Field(
        "hard", description="hard: keep the best box of each cluster; weighted: average the cluster by score (MediaPipe)"
    )

    @model_validator(mode="after")
    def _anchors_for_ssd(self) -> DetectionHead:
        if self.format == "ssd_anchors" and self.anchors is None:
            raise ValueError("format ssd_anchors needs anchors")
        if self.format == "tflite_postprocess" and self.anchors is not None:
            raise ValueError("anchors are for format ssd_anchors only")
        return self


Head = Annotated[ClassificationHead | DetectionHead, Field(discriminator="type")]

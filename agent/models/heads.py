"""Task heads: a model's raw outputs turned into what a client wants (:mod:`agent.models.taskspec`).

* classification: the labels ranked by the first output (``top``);
* detection, ``tflite_postprocess``: the four outputs of ``TFLite_Detection_PostProcess`` (boxes as
  ``[ymin, xmin, ymax, xmax]``, class indices, scores, count), already suppressed inside the model;
* detection, ``ssd_anchors``: raw SSD regressors and scores (MediaPipe's BlazeFace, say) decoded against
  anchors generated as MediaPipe's ``SsdAnchorsCalculator`` does, scored with a sigmoid, then
  non-maximum suppression (hard, or MediaPipe's weighted blending).

Boxes come out as ``[x_min, y_min, x_max, y_max]`` in the picture's 0..1 coordinates (undoing letterbox
padding or a crop through the :class:`~agent.models.images.Frame`), clipped to the picture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from agent.models.images import Frame
from agent.models.taskspec import AnchorConfig, DetectionHead

POSTPROCESS_OUTPUTS = 4


def top_labels(labels: list[str], scores: np.ndarray, top_k: int) -> list[dict[str, Any]] | None:
    """The ``top_k`` labels by score, highest first; None if there are no labels or they do not match the scores."""
    if not labels or top_k == 0:
        return None
    array = np.asarray(scores)
    # Sizes compared before converting: a model without labels (a detector's 14,336 raw regressor values, say)
    # would otherwise pay ~450 us per reply to build and free a list nobody reads.
    if array.size != len(labels):
        return None
    values = array.reshape(-1).tolist()
    # Plain Python: for a handful of labels this is several times cheaper than numpy's argsort.
    order = sorted(range(len(values)), key=values.__getitem__, reverse=True)[:top_k]  # stable, as by -value
    return [{"label": labels[index], "score": round(float(values[index]), 6)} for index in order]


def head_problem(head: DetectionHead, outputs: list[list[int]]) -> str | None:
    """Why ``head`` cannot decode outputs of these shapes, or None."""
    if head.format == "tflite_postprocess":
        if len(outputs) != POSTPROCESS_OUTPUTS or len(outputs[0]) != 3 or outputs[0][-1] != 4:
            return f"tflite_postprocess needs outputs boxes [1, N, 4], classes, scores, count; the model has {outputs}"
        return None
    assert head.anchors is not None
    if len(outputs) != 2 or len(outputs[0]) != 3 or len(outputs[1]) != 3:
        return (
            "ssd_anchors needs outputs regressors [1, anchors, values] and scores [1, anchors, classes]; "
            f"the model has {outputs}"
        )
    anchors = len(ssd_anchors(head.anchors.model_dump_json()))
    if outputs[0][1] != anchors or outputs[1][1] != anchors:
        return f"the anchor config makes {anchors} anchors, the outputs have {outputs[0][1]}"
    if outputs[0][2] < 4 + 2 * head.num_keypoints:
        return f"regressors of {outputs[0][2]} values cannot hold a box and {head.num_keypoints} keypoints"
    return None


@lru_cache(maxsize=32)
def ssd_anchors(config_json: str) -> np.ndarray:
    """Anchors ``[N, 4]`` as (x_center, y_center, width, height), in MediaPipe's SsdAnchorsCalculator order."""
    config = AnchorConfig.model_validate_json(config_json)
    anchors: list[tuple[float, float, float, float]] = []
    layer = 0
    while layer < config.num_layers:
        sizes: list[tuple[float, float]] = []  # (width, height) of each anchor of a cell
        same = layer
        while same < config.num_layers and config.strides[same] == config.strides[layer]:
            scale = _scale(config, same)
            if same == 0 and config.reduce_boxes_in_lowest_layer:
                ratios_scales = [(1.0, 0.1), (2.0, scale), (0.5, scale)]
            else:
                ratios_scales = [(ratio, scale) for ratio in config.aspect_ratios]
                if config.interpolated_scale_aspect_ratio > 0:
                    following = 1.0 if same == config.num_layers - 1 else _scale(config, same + 1)
                    ratios_scales.append((config.interpolated_scale_aspect_ratio, math.sqrt(scale * following)))
            sizes += [(s * math.sqrt(ratio), s / math.sqrt(ratio)) for ratio, s in ratios_scales]
            same += 1
        stride = config.strides[layer]
        rows, columns = math.ceil(config.input_height / stride), math.ceil(config.input_width / stride)
        for y in range(rows):
            for x in range(columns):
                center_x, center_y = (x + config.anchor_offset_x) / columns, (y + config.anchor_offset_y) / rows
                for width, height in sizes:
                    size = (1.0, 1.0) if config.fixed_anchor_size else (width, height)
                    anchors.append((center_x, center_y, *size))
        layer = same
    return np.asarray(anchors, dtype=np.float32)


def _scale(config: AnchorConfig, layer: int) -> float:
    if config.num_layers == 1:
        return (config.min_scale + config.max_scale) / 2
    return config.min_scale + (config.max_scale - config.min_scale) * layer / (config.num_layers - 1)


def detections(
    head: DetectionHead, labels: list[str], outputs: list[np.ndarray], frame: Frame, input_hw: tuple[int, int], *,
    score_threshold: float, max_detections: int,
) -> list[dict[str, Any]]:
    """The head's detections above ``score_threshold``, best first, at most ``max_detections``."""
    if head.format == "tflite_postprocess":
        boxes, classes, scores = _postprocessed(outputs)
        keypoints = np.zeros((len(scores), 0, 2), dtype=np.float32)
        keep = np.flatnonzero(scores >= score_threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        boxes, keypoints, classes, scores = boxes[keep], keypoints[keep], classes[keep], scores[keep]
    else:
        boxes, keypoints, classes, scores = _suppressed(head, *_ssd_decoded(head, outputs, input_hw, score_threshold))
    count = min(max_detections, len(scores))
    return _as_json(labels, head.label_offset, frame, boxes[:count], keypoints[:count], classes[:count], scores[:count])


def _postprocessed(outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes as x_min, y_min, x_max, y_max, classes and scores of the ``count`` valid rows."""
    raw_boxes, classes, scores, count = (np.asarray(output, dtype=np.float32) for output in outputs)
    valid = max(0, min(int(count.reshape(-1)[0]), raw_boxes.shape[1]))
    y_min, x_min, y_max, x_max = raw_boxes[0, :valid].T
    return np.stack([x_min, y_min, x_max, y_max], axis=-1), classes.reshape(-1)[:valid], scores.reshape(-1)[:valid]


@dataclass(frozen=True)
class _SsdDecoder:
    """What decoding depends on besides the outputs, computed once per (anchors, scales)."""

    centre: np.ndarray  # [N, 2] anchor x, y
    size: np.ndarray  # [N, 2] anchor width, height
    offset_scale: np.ndarray  # [2] x, y scales of the regressors' centre offsets and keypoints
    size_scale: np.ndarray  # [2] w, h scales of their box sizes


@lru_cache(maxsize=32)
def _ssd_decoder(config_json: str, scales: tuple[float, ...]) -> _SsdDecoder:
    anchors = ssd_anchors(config_json)
    x_scale, y_scale, w_scale, h_scale = scales
    return _SsdDecoder(
        centre=np.ascontiguousarray(anchors[:, :2]),
        size=np.ascontiguousarray(anchors[:, 2:]),
        offset_scale=np.asarray([x_scale, y_scale], dtype=np.float32),
        size_scale=np.asarray([w_scale, h_scale], dtype=np.float32),
    )


# Candidates are picked on the raw logits first, against a bound a little below the threshold's logit: the
# exact float32 sigmoid of the few picked is then compared with the threshold itself, as for every anchor.
_CANDIDATE_MARGIN = 1e-5


def _candidate_bound(head: DetectionHead, score_threshold: float) -> float:
    """A raw score every anchor that can clear ``score_threshold`` reaches (after clipping): -inf if all can."""
    if head.sigmoid_scores:
        lowest = score_threshold - _CANDIDATE_MARGIN
        if 0.0 < lowest < 1.0:
            bound = math.log(lowest / (1.0 - lowest))
        else:
            bound = math.inf if lowest >= 1.0 else -math.inf
    else:
        bound = score_threshold - _CANDIDATE_MARGIN * (1.0 + abs(score_threshold))
    # A logit clipped up to -score_clipping scores as that: if that clears the bound, any anchor may.
    if head.score_clipping is not None and -head.score_clipping >= bound:
        return -math.inf
    return bound


def _ssd_decoded(
    head: DetectionHead, outputs: list[np.ndarray], input_hw: tuple[int, int], score_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Box (corners), keypoints, best class and its score of each anchor scoring at least ``score_threshold``,
    best first; only those are scored and decoded (a face detector has hundreds of anchors and a handful of hits)."""
    assert head.anchors is not None
    logits = np.asarray(outputs[1], dtype=np.float32)[0]
    bound = _candidate_bound(head, score_threshold)
    best_logits = logits[:, 0] if logits.shape[1] == 1 else logits.max(axis=-1)
    rows = np.flatnonzero(best_logits >= bound) if bound > -math.inf else np.arange(len(logits))
    picked = logits[rows]
    if head.score_clipping is not None:
        picked = np.clip(picked, -head.score_clipping, head.score_clipping)
    # tanh form of the sigmoid: no overflow for large negative logits when nothing clips them.
    probabilities = 0.5 * (1.0 + np.tanh(picked / 2)) if head.sigmoid_scores else picked
    if probabilities.shape[1] == 1:  # one class (a face detector): no argmax and fancy indexing to pay for
        classes, scores = np.zeros(len(probabilities), dtype=np.intp), probabilities[:, 0]
    else:
        classes = np.argmax(probabilities, axis=-1)
        scores = probabilities[np.arange(len(classes)), classes]
    if not len(scores):  # nothing near the threshold, as in most frames: nothing to decode
        empty = np.zeros((0, 4), dtype=np.float32)
        return empty, np.zeros((0, head.num_keypoints, 2), dtype=np.float32), classes, scores
    keep = np.flatnonzero(scores >= score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    anchor_rows = rows[keep]
    height, width = input_hw
    decoder = _ssd_decoder(head.anchors.model_dump_json(), tuple(head.box_scale or (width, height, width, height)))
    centre, size = decoder.centre[anchor_rows], decoder.size[anchor_rows]
    raw = np.asarray(outputs[0], dtype=np.float32)[0][anchor_rows]
    # Divided, then multiplied (no precomputed factor): the per-anchor formula's float32 rounding, to the bit.
    box_centre = raw[:, 0:2] / decoder.offset_scale * size + centre
    half = raw[:, 2:4] / decoder.size_scale * size / 2
    boxes = np.concatenate([box_centre - half, box_centre + half], axis=-1)
    points = raw[:, 4:4 + 2 * head.num_keypoints].reshape(len(raw), head.num_keypoints, 2)
    keypoints = points / decoder.offset_scale * size[:, None, :] + centre[:, None, :]
    return boxes, keypoints, classes[keep], scores[keep]


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over union of one ``[x_min, y_min, x_max, y_max]`` box with each of ``others`` (0 where
    the union is empty)."""
    width = np.maximum(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0)
    height = np.maximum(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0)
    intersection = width * height
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = (box[2] - box[0]) * (box[3] - box[1]) + areas - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _suppressed(
    head: DetectionHead, boxes: np.ndarray, keypoints: np.ndarray, classes: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Non-maximum suppression (per class) over candidates sorted best first; they stay in that order."""
    if len(scores) <= 1:
        return boxes, keypoints, classes, scores
    alive = np.ones(len(scores), dtype=bool)
    kept_boxes, kept_points, kept = [], [], []
    for best in range(len(scores)):
        if not alive[best]:
            continue
        cluster = alive & (iou(boxes[best], boxes) > head.iou_threshold) & (classes == classes[best])
        cluster[best] = True
        alive &= ~cluster
        if head.nms == "weighted":
            cluster_scores = scores[cluster]
            total = cluster_scores.sum()
            # Scores that all underflowed to 0 (score_threshold 0) would divide by zero: weigh them equally.
            weights = cluster_scores / total if total > 0 else np.full(len(cluster_scores), 1.0 / len(cluster_scores))
            kept_boxes.append(weights @ boxes[cluster])
            kept_points.append((weights @ keypoints[cluster].reshape(len(weights), -1)).reshape(-1, 2))
        else:
            kept_boxes.append(boxes[best])
            kept_points.append(keypoints[best])
        kept.append(best)
    if not kept:
        return boxes[:0], keypoints[:0], classes[:0], scores[:0]
    # np.array of equal-shaped arrays is np.stack without its Python-level checks (the same array).
    return np.array(kept_boxes), np.array(kept_points), classes[kept], scores[kept]


def _as_json(
    labels: list[str], label_offset: int, frame: Frame, boxes: np.ndarray, keypoints: np.ndarray, classes: np.ndarray,
    scores: np.ndarray,
) -> list[dict[str, Any]]:
    """Detections as the reply carries them, boxes and keypoints mapped onto the picture (all at once: a
    per-detection numpy call costs more than the arithmetic)."""
    # Every x, y of a detection in one float64 row (box corners, then keypoints): one mapping, one rounding.
    # float64 before rounding: a rounded float32 prints as 0.34625500440597534, not 0.346255.
    flat_points = keypoints.reshape(len(boxes), 2 * keypoints.shape[1])
    coordinates = np.concatenate([boxes, flat_points], axis=-1, dtype=np.float64)
    coordinates[:, 0::2], coordinates[:, 1::2] = frame.to_picture(coordinates[:, 0::2], coordinates[:, 1::2])
    np.clip(coordinates[:, :4], 0.0, 1.0, out=coordinates[:, :4])
    rows = np.round(coordinates, 6).tolist()
    found = []
    for index, klass in enumerate((classes.astype(np.int64) + label_offset).tolist()):
        row = rows[index]
        detection: dict[str, Any] = {
            "label": labels[klass] if 0 <= klass < len(labels) else str(klass),
            "score": round(float(scores[index]), 6),
            "box": row[:4],
        }
        if len(row) > 4:
            detection["keypoints"] = [row[at:at + 2] for at in range(4, len(row), 2)]
        found.append(detection)
    return found

"""Images in, tensors out: a JPEG or PNG sent as base64 is decoded (Pillow), resized, put in colour order,
normalised and cast as the input's manifest ``preprocess`` says (:class:`~agent.models.taskspec.Preprocess`).

The pixel count is read from the header and bounded before anything is decoded: a few hundred bytes of
PNG can claim gigapixels (a decompression bomb). JPEGs are decoded at a reduced DCT scale when the tensor
is much smaller than the picture (``Image.draft``), which is most of the decode cost saved for free.

:class:`Frame` remembers where the picture landed in the tensor (letterbox padding, a crop), so boxes a
head finds in tensor coordinates are reported in the picture's own 0..1 coordinates.
"""

from __future__ import annotations

import binascii
import functools
import io
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pybase64

from agent.errors import InvalidParams
from agent.models.inference import TensorInfo, quantize
from agent.models.taskspec import Preprocess

if TYPE_CHECKING:
    from PIL import Image

IMAGE_FORMATS = ("JPEG", "PNG")


@functools.cache
def _silence_pillow_size_warning() -> None:
    """Pillow warns (and past twice its limit refuses) on large pictures; our own bound comes first. Set once
    for the process: warnings.catch_warnings() per call is not thread-safe across inference workers."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Frame:
    """Tensor 0..1 coordinates to picture 0..1 coordinates: ``x_picture = x * scale_x + offset_x``."""

    scale_x: float = 1.0
    offset_x: float = 0.0
    scale_y: float = 1.0
    offset_y: float = 0.0

    def to_picture(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map tensor-relative coordinates onto the picture's."""
        return xs * self.scale_x + self.offset_x, ys * self.scale_y + self.offset_y


def image_shape(name: str, shape: list[int] | tuple[int, ...], spec: Preprocess) -> tuple[int, int, int]:
    """The (height, width, channels) an image input takes; :class:`ValueError` if the tensor cannot take one."""
    channels = 1 if spec.color == "grayscale" else 3
    if len(shape) != 4 or shape[0] != 1 or shape[3] != channels or min(shape[1:3]) < 1:
        raise ValueError(f"input {name!r} {list(shape)} is not [1, height, width, {channels}] for {spec.color} images")
    for values in (spec.mean, spec.std):
        if values is not None and len(values) not in (1, channels):
            raise ValueError(f"input {name!r}: mean and std need 1 or {channels} values, not {len(values)}")
    return shape[1], shape[2], channels


def open_image(b64: object, *, max_pixels: int) -> Image.Image:
    """The picture in a base64 JPEG or PNG, header read and its size checked, not yet decoded."""
    # Pillow (2 MB of libraries) is imported by the first image request, not by every agent that has no image model.
    from PIL import Image, UnidentifiedImageError

    _silence_pillow_size_warning()
    if not isinstance(b64, str):
        raise InvalidParams("image.b64 must be a base64 string of a JPEG or PNG file")
    try:
        raw = pybase64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParams("image.b64 is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        # Past twice its own limit Pillow refuses in open(), before our bound could name the size.
        raise InvalidParams(
            f"image claims more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, beyond the limit of {max_pixels} pixels "
            "(decoded pictures are bounded before decoding)",
            data={"max_pixels": max_pixels},
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidParams("image.b64 holds no JPEG or PNG picture") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidParams(
            f"image of {width} x {height} = {width * height} pixels exceeds the limit of {max_pixels} pixels "
            "(decoded pictures are bounded before decoding)",
            data={"width": width, "height": height, "max_pixels": max_pixels},
        )
    return image


def image_tensor(info: TensorInfo, spec: Preprocess, b64: object, *, max_pixels: int) -> tuple[np.ndarray, Frame]:
    """The input tensor for a base64 JPEG or PNG, and where the picture landed in it."""
    from PIL import Image

    height, width, _ = image_shape(info.name, info.shape, spec)
    image = open_image(b64, max_pixels=max_pixels)
    mode = "L" if spec.color == "grayscale" else "RGB"
    try:
        if image.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale while that still covers what the resize will keep.
            image.draft(mode, _needed_size(spec, image.size, width, height))
        image.load()
        if image.mode != mode:  # convert() to the mode it already has copies the picture (~10 us per drafted JPEG)
            image = image.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise InvalidParams("image.b64: the picture cannot be decoded (truncated or corrupt)") from None
    pixels, frame = _fit(image, spec, width, height)
    if spec.color == "bgr":
        pixels = pixels[..., ::-1]
    return _as_input(info, spec, pixels.reshape(info.shape)), frame


def _needed_size(spec: Preprocess, source: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """The smallest picture size from which ``spec.resize`` still makes the tensor without upscaling."""
    source_w, source_h = source
    if spec.resize == "stretch":
        return width, height
    # letterbox fits the whole picture inside; crop covers the tensor with the picture's centre.
    pick = min if spec.resize == "letterbox" else max
    scale = pick(width / source_w, height / source_h)
    return max(1, math.ceil(source_w * scale)), max(1, math.ceil(source_h * scale))


def _fit(image: Image.Image, spec: Preprocess, width: int, height: int) -> tuple[np.ndarray, Frame]:
    """Resize as ``spec.resize`` says: a ``height x width (x channels)`` array of 0..255 floats and its frame."""
    from PIL import Image

    source_w, source_h = image.size
    if spec.resize == "stretch":
        return _pixels(image.resize((width, height), Image.Resampling.BILINEAR)), Frame()
    if spec.resize == "crop":
        # The largest centred region of the tensor's aspect ratio.
        crop_w = min(source_w, source_h * width / height)
        crop_h = min(source_h, source_w * height / width)
        left, top = (source_w - crop_w) / 2, (source_h - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
        resized = image.resize((width, height), Image.Resampling.BILINEAR, box=box)
        return _pixels(resized), Frame(crop_w / source_w, left / source_w, crop_h / source_h, top / source_h)
    scale = min(width / source_w, height / source_h)
    fit_w, fit_h = max(1, round(source_w * scale)), max(1, round(source_h * scale))
    left, top = (width - fit_w) // 2, (height - fit_h) // 2
    canvas = np.full((height, width, len(image.getbands())), spec.pad_value, dtype=np.float32)
    canvas[top:top + fit_h, left:left + fit_w] = _pixels(image.resize((fit_w, fit_h), Image.Resampling.BILINEAR))
    return canvas, Frame(width / fit_w, -left / fit_w, height / fit_h, -top / fit_h)


def _pixels(image: Image.Image) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32)
    return array if array.ndim == 3 else array[..., np.newaxis]


def _as_input(info: TensorInfo, spec: Preprocess, pixels: np.ndarray) -> np.ndarray:
    """Normalise 0..255 pixels as ``spec`` says and cast them to the tensor's dtype (quantized if it is)."""
    if spec.mean is not None and spec.std is not None:
        real = (pixels - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    elif spec.range is not None:
        low, high = spec.range
        real = low + pixels * np.float32((high - low) / 255.0)
    else:
        real = pixels
    if info.quantized:
        return quantize(info, real)
    if info.dtype.kind in "iu":
        limits = np.iinfo(info.dtype)
        return np.clip(np.rint(real), limits.min, limits.max).astype(info.dtype)
    return real.astype(info.dtype, copy=False)

"""Image inputs: a JPEG or PNG becomes exactly the tensor the manifest's ``preprocess`` describes, pictures
are bounded before decoding, and anything that is not a picture is a -32602, never another exception."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agent.errors import InvalidParams
from agent.models.images import Frame, image_tensor
from agent.models.inference import TensorInfo
from agent.models.taskspec import Preprocess


def _info(height: int = 4, width: int = 6, channels: int = 3, dtype: str = "float32", scale: float = 0.0, zero_point: int = 0) -> TensorInfo:
    return TensorInfo("image", 0, (1, height, width, channels), np.dtype(dtype), scale, zero_point)


def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_stretch_rgb_mean_std_is_the_reference_computation() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 6, 3))
    spec = Preprocess(mean=[10.0, 20.0, 30.0], std=[2.0, 4.0, 8.0])
    tensor, frame = image_tensor(_info(), spec, _png(pixels), max_pixels=100)
    expected = (pixels - np.array([10.0, 20.0, 30.0])) / np.array([2.0, 4.0, 8.0])
    np.testing.assert_allclose(tensor[0], expected, rtol=1e-6)
    assert tensor.dtype == np.float32 and frame == Frame()


def test_bgr_range_and_quantized_uint8() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(4, 6, 3))
    bgr, _ = image_tensor(_info(), Preprocess(color="bgr", range=(-1.0, 1.0)), _png(pixels), max_pixels=100)
    np.testing.assert_allclose(bgr[0], pixels[..., ::-1] / 127.5 - 1.0, atol=1e-6)
    quantized_info = _info(dtype="uint8", scale=1 / 255, zero_point=0)
    quantized, _ = image_tensor(quantized_info, Preprocess(range=(0.0, 1.0)), _png(pixels), max_pixels=100)
    np.testing.assert_array_equal(quantized[0], pixels)


def test_grayscale_into_a_one_channel_input() -> None:
    pixels = np.full((4, 6, 3), 200)
    tensor, _ = image_tensor(_info(channels=1, dtype="uint8"), Preprocess(color="grayscale"), _png(pixels), max_pixels=100)
    assert tensor.shape == (1, 4, 6, 1) and (tensor == 200).all()


def test_letterbox_pads_and_its_frame_maps_back_to_the_picture() -> None:
    # A white 8 x 4 picture into 4 x 4: it fills the middle two rows, the rest is padding.
    tensor, frame = image_tensor(
        _info(height=4, width=4), Preprocess(resize="letterbox", pad_value=0), _png(np.full((4, 8, 3), 255)), max_pixels=100
    )
    assert (tensor[0, 1:3] == 255).all() and (tensor[0, [0, 3]] == 0).all()
    xs, ys = frame.to_picture(np.array([0.0, 1.0]), np.array([0.25, 0.75]))
    np.testing.assert_allclose([*xs, *ys], [0.0, 1.0, 0.0, 1.0])


def test_crop_takes_the_centre_and_its_frame_maps_back() -> None:
    pixels = np.zeros((4, 8, 3))
    pixels[:, 2:6] = 255  # the centred 4 x 4 square is white
    tensor, frame = image_tensor(_info(height=4, width=4), Preprocess(resize="crop"), _png(pixels), max_pixels=100)
    assert (tensor == 255).all()
    xs, ys = frame.to_picture(np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    np.testing.assert_allclose([*xs, *ys], [0.25, 0.75, 0.0, 1.0])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels: a decompression bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("side", "message"), [(5_000, "25000000 pixels exceeds"), (100_000, "beyond")])
def test_a_decompression_bomb_is_refused_before_decoding(side: int, message: str) -> None:
    bomb = base64.b64encode(_png_header_only(side, side)).decode()
    with pytest.raises(InvalidParams, match=f"{message}.* the limit of 16777216 pixels") as caught:
        image_tensor(_info(), Preprocess(), bomb, max_pixels=16_777_216)
    assert caught.value.code == -32602 and caught.value.data["max_pixels"] == 16_777_216


@pytest.mark.parametrize(
    ("b64", "message"),
    [
        ("%%%", "not valid base64"),
        (base64.b64encode(b"GIF89a not allowed").decode(), "no JPEG or PNG"),
        (base64.b64encode(_png_header_only(20, 30)).decode(), "cannot be decoded"),
        (17, "must be a base64 string"),
    ],
    ids=["base64", "format", "truncated", "type"],
)
def test_what_is_not_a_picture_is_invalid_params(b64: object, message: str) -> None:
    with pytest.raises(InvalidParams, match=message):
        image_tensor(_info(), Preprocess(), b64, max_pixels=1_000)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    target=st.tuples(st.integers(1, 16), st.integers(1, 16)),
    resize=st.sampled_from(["stretch", "letterbox", "crop"]),
    low_high=st.tuples(st.floats(-10, 10), st.floats(-10, 10)),
    jpeg=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_picture_makes_a_tensor_of_the_input_shape_within_the_range(
    width: int, height: int, target: tuple[int, int], resize: str, low_high: tuple[float, float], jpeg: bool, seed: int
) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG" if jpeg else "PNG")
    low, high = sorted(low_high)
    info = _info(height=target[0], width=target[1])
    spec = Preprocess(resize=resize, range=(low, high))  # type: ignore[arg-type]
    tensor, frame = image_tensor(info, spec, base64.b64encode(buffer.getvalue()).decode(), max_pixels=10_000)
    assert tensor.shape == info.shape and tensor.dtype == np.float32
    assert tensor.min() >= low - 1e-4 and tensor.max() <= high + 1e-4
    # The picture's own corners land inside the tensor: its frame maps them back onto 0..1.
    inverse_x = (np.array([0.0, 1.0]) - frame.offset_x) / frame.scale_x
    inverse_y = (np.array([0.0, 1.0]) - frame.offset_y) / frame.scale_y
    if resize == "crop":
        assert inverse_x[0] <= 1e-6 and inverse_x[1] >= 1 - 1e-6 and inverse_y[0] <= 1e-6 and inverse_y[1] >= 1 - 1e-6
    else:
        assert -1e-6 <= inverse_x[0] <= inverse_x[1] <= 1 + 1e-6 and -1e-6 <= inverse_y[0] <= inverse_y[1] <= 1 + 1e-6


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_a_picture_or_invalid_params(data: bytes) -> None:
    for payload in (data, b"\x89PNG\r\n\x1a\n" + data, b"\xff\xd8\xff" + data):
        try:
            tensor, _ = image_tensor(_info(), Preprocess(), base64.b64encode(payload).decode(), max_pixels=10_000)
        except InvalidParams:
            continue
        assert tensor.shape == (1, 4, 6, 3)

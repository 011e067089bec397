"""TFLite Metadata read through the generated metadata schema, and damaged metadata refused as a ModelError.

The fixture packs metadata with the same generated object API the reader reads it with, so these tests pin
what is read; a wrong field would show as a missing value here, not as a passing test.
"""

from __future__ import annotations

import random
import struct

import pytest

from agent.errors import ModelError
from agent.models.tflite_file import ModelMetadata, TensorMetadata, read_file_facts
from tests.fixtures.generated_models import constant_classifier
from tests.fixtures.tflite_metadata import TensorMeta, metadata_flatbuffer, with_metadata

LABELS = {"labels.txt": b"cold\nhot\n\n", "other.txt": b"a\n"}


def _metadata() -> bytes:
    return metadata_flatbuffer(
        "toy",
        "a toy classifier",
        [TensorMeta("features", "two sensor values", mean=[127.5, 0.5], std=[127.5, 2.0])],
        [
            TensorMeta("scores", "class probabilities", label_file="labels.txt"),
            TensorMeta("extra", label_file="other.txt"),
        ],
    )


def _refused(content: bytes) -> bool:
    """Whether the file is refused; any exception other than ModelError fails the test."""
    try:
        read_file_facts(content)
    except ModelError:
        return True
    return False


def test_metadata_written_with_the_generated_schema_reads_back_whole() -> None:
    content = with_metadata(constant_classifier([0.25, 0.75]), _metadata(), LABELS)
    assert read_file_facts(content).metadata == ModelMetadata(
        name="toy",
        description="a toy classifier",
        inputs=[TensorMetadata("features", "two sensor values", mean=[127.5, 0.5], std=[127.5, 2.0])],
        outputs=[
            TensorMetadata("scores", "class probabilities", labels=["cold", "hot"]),
            TensorMetadata("extra", labels=["a"]),
        ],
    )


def test_a_label_file_named_but_not_packed_is_refused() -> None:
    content = with_metadata(constant_classifier([0.25, 0.75]), _metadata(), {"labels.txt": b"cold\nhot\n"})
    with pytest.raises(ModelError, match="'other.txt' is named in the metadata but not packed"):
        read_file_facts(content)


def test_truncated_metadata_is_refused_as_a_model_error() -> None:
    metadata, model = _metadata(), constant_classifier([0.25, 0.75])
    refused = [_refused(with_metadata(model, metadata[:size], LABELS)) for size in range(8, len(metadata))]
    assert sum(refused) > len(refused) // 2


def test_an_offset_outside_uint32_is_refused_as_a_model_error() -> None:
    # The root table's vtable offset points 2**31 - 1 bytes before the buffer: flatbuffers raises TypeError.
    metadata = struct.pack("<I", 8) + b"M001" + struct.pack("<i", 2**31 - 1)
    content = with_metadata(constant_classifier([0.25, 0.75]), metadata)
    with pytest.raises(ModelError, match="damaged"):
        read_file_facts(content)


def test_garbage_in_metadata_is_read_or_refused_as_a_model_error() -> None:
    metadata, model = _metadata(), constant_classifier([0.25, 0.75])
    content = with_metadata(model, metadata, LABELS)
    start = content.index(metadata)
    rng = random.Random(16)
    refused = 0
    for _ in range(400):
        # Same length, so the model's offsets stay valid and only the metadata flatbuffer is damaged.
        damaged = bytearray(content)
        for _ in range(rng.randint(1, 4)):
            damaged[start + rng.randrange(8, len(metadata))] = rng.randrange(256)
        refused += _refused(bytes(damaged))
    for _ in range(100):
        garbage = rng.randbytes(rng.randint(0, 64))
        refused += _refused(with_metadata(model, garbage[:4] + b"M001" + garbage[4:]))
    assert refused > 0

"""A manifest entry checked against its model file: mismatches refuse that model, omissions are filled in.

Uses a real third-party model, microWakeWord's int8 "okay_nabu" (pymicro-wakeword), whose signature names
(``input_audio``, ``dense_1``) differ from its tensor names, and generated models carrying TFLite Metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from agent.config import Limits
from agent.models.devmodels import add_wake_word, wakeword_model_path
from agent.models.inference import prepare_input
from agent.models.manager import ModelManager
from agent.models.tflite_file import read_file_facts
from agent.serving.protocol import Request
from agent.serving.service import RequestService, Timing
from tests.fixtures.generated_models import add_model, constant_classifier
from tests.fixtures.tflite_metadata import TensorMeta, metadata_flatbuffer, with_metadata

WAKEWORD_INPUT = {"name": "input_audio", "shape": [1, 3, 40], "dtype": "int8"}
WAKEWORD_OUTPUT = {"name": "dense_1", "shape": [1, 1], "dtype": "uint8"}


def _add_wakeword(models_dir: Path, **fields: Any) -> None:
    """The wake word model with a minimal entry (id, version, task, file, sha256) plus ``fields``."""
    add_wake_word(models_dir, **fields)


def _features(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 26, size=(1, 3, 40)).astype(np.float64)


def test_minimal_entry_is_filled_from_the_file_with_signature_names(tmp_path: Path) -> None:
    _add_wakeword(tmp_path)
    manager = ModelManager(tmp_path)
    assert manager.verify_all() == {}
    entry = manager.entry("okay-nabu")
    [spec] = entry.inputs
    assert spec.model_dump(include={"name", "shape", "dtype"}) == WAKEWORD_INPUT
    assert spec.quantization is not None and spec.quantization.zero_point == -128
    assert entry.outputs[0].model_dump(include={"name", "shape", "dtype"}) == WAKEWORD_OUTPUT

    # The signature name is what infer takes; the result is LiteRT's on a fresh interpreter.
    content = wakeword_model_path().read_bytes()
    direct = Interpreter(model_content=content)
    direct.allocate_tensors()
    with manager.lease("okay-nabu") as loaded:
        info = loaded.input_info("input_audio")
        feed = prepare_input(info, _features(1), raw=False, max_elements=10_000)
        served = loaded.run({"input_audio": feed})
    direct.set_tensor(direct.get_input_details()[0]["index"], feed)
    direct.invoke()
    np.testing.assert_array_equal(served["dense_1"], direct.get_tensor(direct.get_output_details()[0]["index"]))


def test_models_list_and_tools_list_describe_a_minimal_entry_as_served(tmp_path: Path) -> None:
    """The issue's finding: a minimal entry used to be advertised with no inputs or outputs (an empty schema)."""
    _add_wakeword(tmp_path)
    manager = ModelManager(tmp_path)
    manager.verify_all()
    service = RequestService(manager, Limits(), device_id="d", profile="p")
    [listed] = service.handle(Request(jsonrpc="2.0", method="models/list", id=1), Timing(received=0.0))["models"]
    assert [spec["name"] for spec in listed["inputs"]] == ["input_audio"] and listed["inputs"][0]["shape"] == [1, 3, 40]
    assert [spec["name"] for spec in listed["outputs"]] == ["dense_1"] and listed["stateful"] is True
    [tool] = service.handle(Request(jsonrpc="2.0", method="tools/list", id=1), Timing(received=0.0))["tools"]
    assert tool["inputSchema"]["required"] == ["input_audio"]
    assert tool["description"] == "Run model okay-nabu. Stateful: each stream keeps its own state between calls."


def test_unchanged_minimal_entry_survives_a_reload(tmp_path: Path) -> None:
    _add_wakeword(tmp_path)
    manager = ModelManager(tmp_path)
    manager.verify_all()
    with manager.lease("okay-nabu"):
        pass
    events: list[str] = []
    manager.on_event = lambda kind, **detail: events.append(kind)
    assert manager.reload()
    assert manager.loaded_ids == ["okay-nabu"] and events == []


@pytest.mark.parametrize(
    ("declared", "named"),
    [
        ({"inputs": [{"name": "audio", "shape": [1, 4, 40]}]}, ["[1, 4, 40]", "[1, 3, 40]", "audio"]),
        ({"inputs": [{"name": "audio", "dtype": "float32"}]}, ["float32", "int8", "audio"]),
        ({"outputs": [{"name": "a"}, {"name": "b"}]}, ["2 outputs (a, b)", "1 (dense_1 [1, 1] uint8)"]),
        (
            {"inputs": [{"name": "audio", "quantization": {"scale": 0.5, "zero_point": 0}}]},
            ["quantization {'scale': 0.5, 'zero_point': 0}", "'zero_point': -128", "audio"],
        ),
        # Every mismatch is named, not only the first: an input's shape and an output's dtype together.
        (
            {"inputs": [{"name": "audio", "shape": [1, 4, 40]}], "outputs": [{"name": "score", "dtype": "float32"}]},
            ["input 0 'audio'", "[1, 4, 40]", "output 0 'score'", "dtype float32, the file has uint8"],
        ),
    ],
    ids=["shape", "dtype", "count", "quantization", "every-mismatch"],
)
def test_a_mismatch_refuses_that_model_naming_both_and_the_others_serve(
    tmp_path: Path, declared: dict[str, Any], named: list[str]
) -> None:
    add_model(tmp_path, "steady", constant_classifier([0.25, 0.75]), labels=["a", "b"])
    _add_wakeword(tmp_path, **declared)
    manager = ModelManager(tmp_path)
    refused = manager.verify_all()
    assert list(refused) == ["okay-nabu"]
    assert all(part in refused["okay-nabu"] for part in named), refused["okay-nabu"]
    assert manager.servable_ids == ["steady"]
    with manager.lease("steady") as loaded:
        assert loaded.inputs[0].name == "x"


def test_wakeword_keeps_state_in_resource_variables() -> None:
    facts = read_file_facts(wakeword_model_path().read_bytes())
    assert facts.has_resource_variables and facts.metadata is None
    assert not read_file_facts(constant_classifier([0.5, 0.5])).has_resource_variables


def test_tflite_metadata_fills_labels_descriptions_and_normalization(tmp_path: Path) -> None:
    metadata = metadata_flatbuffer(
        "toy",
        "a toy classifier with metadata",
        [TensorMeta("features", "two sensor values", mean=[127.5], std=[127.5])],
        [TensorMeta("scores", "class probabilities", label_file="labels.txt")],
    )
    content = with_metadata(constant_classifier([0.25, 0.75]), metadata, {"labels.txt": b"cold\nhot\n"})
    add_model(tmp_path, "toy", content)
    manager = ModelManager(tmp_path)
    assert manager.verify_all() == {}
    entry = manager.entry("toy")
    assert entry.labels == ["cold", "hot"]
    assert entry.description == "a toy classifier with metadata"
    assert entry.inputs[0].name == "x" and entry.inputs[0].description == "two sensor values"
    assert entry.inputs[0].normalization is not None and entry.inputs[0].normalization.mean == [127.5]
    assert entry.outputs[0].description == "class probabilities"


def test_a_damaged_file_whose_sha256_matches_is_refused(tmp_path: Path) -> None:
    add_model(tmp_path, "steady", constant_classifier([0.25, 0.75]))
    add_model(tmp_path, "damaged", constant_classifier([0.5, 0.5])[:200])
    manager = ModelManager(tmp_path)
    refused = manager.verify_all()
    assert list(refused) == ["damaged"] and "refused" in refused["damaged"]
    assert manager.servable_ids == ["steady"]

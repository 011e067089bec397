"""The bundled models in models/: manifest integrity, reproducible generation, and real inference."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
MANIFEST = json.loads((MODELS_DIR / "manifest.json").read_text(encoding="utf-8"))
ENTRIES = {entry["id"]: entry for entry in MANIFEST["models"]}
RESOLVERS = {
    "xnnpack": OpResolverType.AUTO,
    "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
}
NUMPY_DTYPES = {"float32": np.float32, "int8": np.int8}


@pytest.fixture(scope="module")
def generate() -> ModuleType:
    """models/generate.py loaded as a module (it imports its sibling tflite_graph.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(MODELS_DIR))
        spec = importlib.util.spec_from_file_location("bundled_models_generate", MODELS_DIR / "generate.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def _interpreter(entry: dict, resolver: OpResolverType) -> Interpreter:
    interpreter = Interpreter(model_path=str(MODELS_DIR / entry["file"]),
                              experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    return interpreter


def _classify(interpreter: Interpreter, values: list[list[float]]) -> np.ndarray:
    """Quantize real inputs as the agent must, invoke, and return dequantized probabilities."""
    input_detail = interpreter.get_input_details()[0]
    output_detail = interpreter.get_output_details()[0]
    tensor = np.asarray(values, dtype=np.float32)
    if input_detail["dtype"] == np.int8:
        scale, zero_point = input_detail["quantization"]
        tensor = np.clip(np.round(tensor / scale) + zero_point, -128, 127).astype(np.int8)
    interpreter.set_tensor(input_detail["index"], tensor)
    interpreter.invoke()
    output = interpreter.get_tensor(output_detail["index"])
    if output_detail["dtype"] == np.int8:
        scale, zero_point = output_detail["quantization"]
        return (output.astype(np.float32) - zero_point) * scale
    return output


def test_manifest_lists_both_models_with_existing_files() -> None:
    assert set(ENTRIES) == {"vibration-anomaly", "sensor-state"}
    for entry in ENTRIES.values():
        assert (MODELS_DIR / entry["file"]).is_file()
        assert {example["expect"] for example in entry["examples"]} == set(entry["labels"])


@pytest.mark.parametrize("model_id", sorted(ENTRIES))
def test_manifest_sha256_matches_file(model_id: str) -> None:
    entry = ENTRIES[model_id]
    digest = hashlib.sha256((MODELS_DIR / entry["file"]).read_bytes()).hexdigest()
    assert digest == entry["sha256"]


@pytest.mark.parametrize("model_id", sorted(ENTRIES))
def test_manifest_tensors_match_model_in_order(model_id: str) -> None:
    entry = ENTRIES[model_id]
    interpreter = _interpreter(entry, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    for declared, actual in (
        (entry["inputs"], interpreter.get_input_details()),
        (entry["outputs"], interpreter.get_output_details()),
    ):
        assert [spec["name"] for spec in declared] == [detail["name"] for detail in actual]
        assert [spec["shape"] for spec in declared] == [detail["shape"].tolist() for detail in actual]
        assert [NUMPY_DTYPES[spec["dtype"]] for spec in declared] == [d["dtype"] for d in actual]
    assert entry["outputs"][0]["shape"] == [1, len(entry["labels"])]


def test_sensor_state_is_fully_int8_with_tflite_softmax_quantization() -> None:
    interpreter = _interpreter(ENTRIES["sensor-state"], OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    for detail in interpreter.get_tensor_details():
        if detail["name"].endswith("/bias"):
            assert detail["dtype"] == np.int32
        else:
            assert detail["dtype"] == np.int8, detail["name"]
        assert detail["quantization"][0] > 0, detail["name"]
    assert interpreter.get_output_details()[0]["quantization"] == (1.0 / 256.0, -128)


@pytest.mark.parametrize("model_id", sorted(ENTRIES))
def test_default_delegate_takes_over_the_graph(model_id: str) -> None:
    interpreter = _interpreter(ENTRIES[model_id], OpResolverType.AUTO)
    op_names = [op["op_name"] for op in interpreter._get_ops_details()]
    assert "DELEGATE" in op_names


@pytest.mark.parametrize("resolver", sorted(RESOLVERS))
@pytest.mark.parametrize(
    ("model_id", "example_index"),
    [(entry["id"], index) for entry in MANIFEST["models"] for index in range(len(entry["examples"]))],
)
def test_manifest_example_yields_expected_label(model_id: str, example_index: int, resolver: str) -> None:
    entry = ENTRIES[model_id]
    example = entry["examples"][example_index]
    interpreter = _interpreter(entry, RESOLVERS[resolver])
    probabilities = _classify(interpreter, example["inputs"][entry["inputs"][0]["name"]])
    assert probabilities.shape == (1, len(entry["labels"]))
    assert probabilities.sum() == pytest.approx(1.0, abs=0.02)
    assert entry["labels"][int(np.argmax(probabilities))] == example["expect"], example["title"]


def test_generation_is_byte_identical_to_committed_files(generate: ModuleType, tmp_path: Path) -> None:
    written = generate.write_models(tmp_path)
    assert sorted(path.name for path in written) == sorted(
        [entry["file"] for entry in MANIFEST["models"]] + ["manifest.json"]
    )
    for path in written:
        assert path.read_bytes() == (MODELS_DIR / path.name).read_bytes(), path.name


"""Input conversion and real interpreters: float, int8 (quantized) and a third-party model."""

from __future__ import annotations

import base64
import importlib.util
import threading

import numpy as np
import pytest

from agent.config import BUNDLED_MODELS_DIR
from agent.errors import ConfigError, InvalidParams, ModelError, ModelUnavailable
from agent.models.accelerators import load_runtime
from agent.models.catalog import load_manifest, verified_model_bytes
from agent.models.inference import LoadedModel, TensorInfo, decode_output, prepare_input
from agent.models.manager import ModelManager

INT8 = TensorInfo("x", 0, (1, 4), np.dtype("int8"), scale=0.5, zero_point=-10)
F32 = TensorInfo("f", 0, (1, 3), np.dtype("float32"), scale=0.0, zero_point=0)


def test_real_values_are_quantized_and_outputs_dequantized() -> None:
    quantized = prepare_input(INT8, [[0.0, 1.0, -100.0, 1000.0]], raw=False, max_elements=100)
    assert quantized.dtype == np.int8
    assert quantized.tolist() == [[-10, -8, -128, 127]]
    assert decode_output(INT8, quantized, raw=False).tolist() == [[0.0, 1.0, -59.0, 68.5]]


def test_raw_int8_input_must_be_in_range_integers() -> None:
    assert prepare_input(INT8, [[1, 2, 3, 4]], raw=True, max_elements=100).tolist() == [[1, 2, 3, 4]]
    with pytest.raises(InvalidParams, match="integers"):
        prepare_input(INT8, [[1.5, 2, 3, 4]], raw=True, max_elements=100)
    with pytest.raises(InvalidParams, match="range"):
        prepare_input(INT8, [[300, 2, 3, 4]], raw=True, max_elements=100)


def test_b64_tensor_and_its_errors() -> None:
    values = np.array([[1.0, 2.0, 3.0]], dtype="<f4")
    tensor = {"b64": base64.b64encode(values.tobytes()).decode(), "dtype": "float32", "shape": [1, 3]}
    assert prepare_input(F32, tensor, raw=False, max_elements=100).tolist() == [[1.0, 2.0, 3.0]]
    bad_nan = {**tensor, "b64": base64.b64encode(np.array([[1, np.nan, 3]], "<f4").tobytes()).decode()}
    with pytest.raises(InvalidParams, match="NaN"):
        prepare_input(F32, bad_nan, raw=False, max_elements=100)
    with pytest.raises(InvalidParams, match="bytes"):
        prepare_input(F32, {**tensor, "shape": [1, 4]}, raw=False, max_elements=100)
    with pytest.raises(InvalidParams, match="base64"):
        prepare_input(F32, {**tensor, "b64": "***"}, raw=False, max_elements=100)
    with pytest.raises(InvalidParams, match="dtype"):
        prepare_input(F32, {**tensor, "dtype": "complex64"}, raw=False, max_elements=100)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([[1.0, 2.0]], "shape"),
        ([[1.0, "a", 3.0]], "numbers"),
        ([[1.0, [2.0], 3.0]], "rectangular|numbers"),
        ([[1e300, 0.0, 0.0]], "overflow"),
        ([[True, False, True]], "numbers"),
    ],
)
def test_list_input_errors(value: object, match: str) -> None:
    with pytest.raises(InvalidParams, match=match):
        prepare_input(F32, value, raw=False, max_elements=100)


def test_missing_batch_dimension_is_accepted_and_element_limit_enforced() -> None:
    assert prepare_input(F32, [1, 2, 3], raw=False, max_elements=100).shape == (1, 3)
    with pytest.raises(InvalidParams, match="exceed"):
        prepare_input(F32, [1, 2, 3], raw=False, max_elements=2)


def test_corrupt_model_refused_before_loading(tmp_path) -> None:
    manifest = load_manifest(BUNDLED_MODELS_DIR)
    entry = manifest.models[0]
    (tmp_path / "manifest.json").write_text((BUNDLED_MODELS_DIR / "manifest.json").read_text())
    for model in manifest.models:
        (tmp_path / model.file).write_bytes((BUNDLED_MODELS_DIR / model.file).read_bytes())
    corrupt = bytearray((tmp_path / entry.file).read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    (tmp_path / entry.file).write_bytes(bytes(corrupt))
    with pytest.raises(ModelError, match="sha256"):
        verified_model_bytes(tmp_path, entry)
    manager = ModelManager(tmp_path)
    assert entry.id in manager.verify_all()
    with pytest.raises(ModelUnavailable, match="sha256"), manager.lease(entry.id):
        pass
    with manager.lease(manifest.models[1].id) as loaded:
        assert loaded.entry.id == manifest.models[1].id


def test_garbage_model_bytes_give_a_clean_error() -> None:
    entry = load_manifest(BUNDLED_MODELS_DIR).models[0]
    with pytest.raises(ModelUnavailable, match="failed to load"):
        LoadedModel(entry, b"\x00" * 64, runtime=load_runtime())


def test_concurrent_runs_share_a_bounded_interpreter_pool_and_agree(models_dir) -> None:
    manager = ModelManager(models_dir, max_concurrent_inferences=2)
    rng = np.random.default_rng(7)
    images = [rng.random((1, 128, 128, 3), dtype=np.float32) for _ in range(4)]
    mismatches: list[int] = []
    with manager.lease("face-detector") as loaded:
        expected = [loaded.run({"image": image})["classificators"].copy() for image in images]

        def work(offset: int) -> None:
            for step in range(20):
                index = (offset + step) % len(images)
                if not np.array_equal(loaded.run({"image": images[index]})["classificators"], expected[index]):
                    mismatches.append(index)

        threads = [threading.Thread(target=work, args=(offset,)) for offset in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert mismatches == []
        assert 1 <= loaded.interpreter_count <= 2


INTERPRETER_MODULES = {"litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime"}


@pytest.mark.parametrize("choice", ["litert", "tflite-runtime"])
def test_an_explicit_runtime_is_used_or_refused_by_name(models_dir, choice) -> None:
    """Whichever runtimes this interpreter has: an installed one serves the bundled model, a missing one is refused."""
    if importlib.util.find_spec(INTERPRETER_MODULES[choice]) is None:
        with pytest.raises(ConfigError, match=choice):
            ModelManager(models_dir, runtime=choice)
        return
    manager = ModelManager(models_dir, runtime=choice)
    assert manager.runtime.name == choice
    with manager.lease("vibration-anomaly") as loaded:
        assert loaded.runtime.name == choice
        features = loaded.inputs[0]
        feeds = {features.name: prepare_input(features, [[0.2, 0.62, 3.1, 3.0, 0.5, 0.35, 0.15, 41.0]], raw=False, max_elements=100)}
        probabilities = decode_output(loaded.outputs[0], loaded.run(feeds)[loaded.outputs[0].name], raw=False)
    assert probabilities.shape == (1, len(loaded.entry.labels))
    assert abs(float(probabilities.sum()) - 1.0) < 1e-4


def test_auto_prefers_litert_and_falls_back_to_tflite_runtime() -> None:
    installed = [name for name, module in INTERPRETER_MODULES.items() if importlib.util.find_spec(module) is not None]
    assert load_runtime("auto").name == installed[0]

"""Accelerators for real: LiteRT's GPU accelerator on Mesa's lavapipe (a CPU Vulkan driver, installed by
provisioning/system-deps.sh) against XNNPACK, the CPU fallback when there is no Vulkan device, and external
delegates that cannot be used (a missing library, a library that is not a delegate).

Tolerances, GPU (f32 enforced) against CPU on the same random inputs: 1e-5 absolute on the float models'
softmax probabilities, 1e-3 absolute on the face detector's regressors (pixel offsets up to ~100) and
logits; the int8 model's dequantized output within one quantization step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent.config import BUNDLED_MODELS_DIR
from agent.errors import ModelError
from agent.models.accelerators import load_runtime
from agent.models.devmodels import add_face_detector, copy_bundled_models
from agent.models.manager import ModelManager
from tests.fixtures.agents import REPO_ROOT
from tests.fixtures.generated_models import add_model

litert_only = pytest.mark.skipif(load_runtime().name != "litert", reason="the GPU accelerator is LiteRT's")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = copy_bundled_models(tmp_path_factory.mktemp("accel") / "models")
    add_face_detector(models)
    return models


def _random_feeds(manager: ModelManager, model_id: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    with manager.lease(model_id) as loaded:
        feeds = {}
        for info in loaded.inputs:
            if info.dtype.kind in "iu":
                limits = np.iinfo(info.dtype)
                feeds[info.name] = rng.integers(limits.min, limits.max, info.shape, dtype=info.dtype, endpoint=True)
            else:
                feeds[info.name] = rng.uniform(-1, 1, info.shape).astype(info.dtype)
    return feeds


@litert_only
def test_every_model_on_lavapipe_matches_its_cpu_outputs(models_dir: Path) -> None:
    lavapipe = list(Path("/usr/share/vulkan/icd.d").glob("lvp_icd*.json"))
    assert lavapipe, "Mesa's lavapipe is missing: run provisioning/system-deps.sh"
    cpu = ModelManager(models_dir, accelerator="cpu")
    gpu = ModelManager(models_dir, accelerator="gpu", accelerator_required=True)
    gpu.load_accelerated()
    for model_id in cpu.servable_ids:
        feeds = _random_feeds(cpu, model_id)
        with cpu.lease(model_id) as on_cpu, gpu.lease(model_id) as on_gpu:
            assert on_cpu.accelerator_in_use == "cpu"
            assert on_gpu.accelerator_in_use == "gpu", model_id
            expected, got = on_cpu.run(feeds), on_gpu.run(feeds)
            assert on_gpu.memory_bytes > on_gpu.size_bytes  # the compiled model's memory was measured
            for info in on_cpu.outputs:
                if info.quantized:
                    steps = np.abs(got[info.name].astype(np.int32) - expected[info.name].astype(np.int32))
                    assert steps.max() <= 1, model_id
                else:
                    tolerance = 1e-3 if model_id == "face-detector" else 1e-5
                    np.testing.assert_allclose(got[info.name], expected[info.name], rtol=0, atol=tolerance, err_msg=model_id)
        report = gpu.accelerator_report(gpu.entry(model_id))
        assert report == {"requested": "gpu", "in_use": "gpu", "fallback_reason": None}


FALLBACK_SCRIPT = """
import json, logging, sys
from pathlib import Path
from agent.config import BUNDLED_MODELS_DIR
from agent.errors import ModelError
from agent.models.manager import ModelManager
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
models = Path(sys.argv[1])
manager = ModelManager(models, accelerator="gpu")
for _ in range(2):  # loaded, unloaded, loaded again: the fallback is said once
    with manager.lease("vibration-anomaly") as loaded:
        in_use = loaded.accelerator_in_use
    manager.unload_idle()
report = manager.accelerator_report(manager.entry("vibration-anomaly"))
try:
    ModelManager(models, accelerator="gpu", accelerator_required=True).load_accelerated()
    refusal = None
except ModelError as exc:
    refusal = str(exc)
print(json.dumps({"in_use": in_use, "report": report, "refusal": refusal}))
"""


@litert_only
def test_without_a_vulkan_device_gpu_models_run_on_cpu_or_refuse_to_start_when_required(models_dir: Path) -> None:
    # The Vulkan loader reads VK_ICD_FILENAMES once per process: a process of its own sees no device at all.
    env = {**os.environ, "VK_ICD_FILENAMES": "/nonexistent/icd.json", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, str(models_dir)], env=env, capture_output=True, text=True, check=True
    )
    lines = run.stdout.splitlines()
    result = json.loads(lines[-1])
    assert result["in_use"] == "cpu"
    assert result["report"]["requested"] == "gpu" and result["report"]["in_use"] == "cpu"
    assert "GPU accelerator refused the model" in result["report"]["fallback_reason"]
    assert sum("vibration-anomaly 1.0.0 runs on CPU instead" in line for line in lines) == 1
    assert "cannot be loaded on its accelerator" in result["refusal"]


def _delegate_models(root: Path, library: str) -> Path:
    models = root / "models"
    content = (BUNDLED_MODELS_DIR / "vibration_anomaly.tflite").read_bytes()
    add_model(models, "delegated", content, delegate={"library": library, "options": {"device": "usb:0", "verbose": True}})
    return models


@pytest.mark.parametrize(
    ("library", "reason"),
    [
        ("/nonexistent/libedgetpu.so.1", "delegate library /nonexistent/libedgetpu.so.1 cannot be loaded"),
        ("libedgetpu.so.1", "delegate library libedgetpu.so.1 cannot be loaded"),
        ("libm.so.6", "libm.so.6 is not a TFLite delegate (it has no tflite_plugin_create_delegate)"),
    ],
)
def test_an_unusable_delegate_falls_back_to_cpu_or_refuses_when_required(tmp_path: Path, library: str, reason: str) -> None:
    models = _delegate_models(tmp_path, library)
    manager = ModelManager(models)
    with manager.lease("delegated") as loaded:
        assert loaded.accelerator_in_use == "cpu"
        features = loaded.inputs[0]
        probabilities = loaded.run({features.name: np.full(features.shape, 0.5, dtype=features.dtype)})
    assert abs(float(probabilities[loaded.outputs[0].name].sum()) - 1.0) < 1e-4
    report = manager.accelerator_report(manager.entry("delegated"))
    assert report["requested"] == f"delegate:{library}" and report["in_use"] == "cpu"
    assert report["fallback_reason"].startswith(reason)
    with pytest.raises(ModelError, match="cannot be loaded on its accelerator"):
        ModelManager(models, accelerator_required=True).load_accelerated()


def test_a_model_cannot_ask_for_the_gpu_and_a_delegate(tmp_path: Path) -> None:
    models = tmp_path / "models"
    add_model(models, "both", b"\x00" * 16, accelerator="gpu", delegate={"library": "libedgetpu.so.1"})
    with pytest.raises(ModelError, match="not both"):
        ModelManager(models)


@litert_only
def test_the_accelerator_in_use_shows_in_models_list_the_status_and_metrics(start_agent, client_factory) -> None:
    agent = start_agent(inference={"accelerator": "gpu"})
    client = client_factory("alice")
    features = {"features": [[0.2, 0.62, 3.1, 3.0, 0.5, 0.35, 0.15, 41.0]]}
    assert "result" in client.call("infer", {"model": "vibration-anomaly", "inputs": features}, timeout=60)
    listed = {model["id"]: model for model in client.call("models/list", timeout=30)["result"]["models"]}
    assert listed["vibration-anomaly"]["accelerator"]["in_use"] == "gpu"
    assert agent.status_document()["accelerators"]["vibration-anomaly"] == "gpu"
    assert agent.metrics_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10) as response:
        scraped = response.read().decode()
    assert 'edge_agent_model_accelerator{accelerator="gpu",model="vibration-anomaly"} 1.0' in scraped

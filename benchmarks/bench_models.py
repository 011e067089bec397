"""Memory and model load time of the agent, per hardware profile: idle, with each bundled model loaded, under load.

Run: ``python -m benchmarks.bench_models``. For each profile an agent process (``python -m agent run``,
no signing, no rate limit) serves the bundled models plus the MediaPipe face detector on a private
mosquitto. Figures: the process's VmRSS/VmHWM (from /proc) when idle, after each model's first request
(cumulative: every model stays loaded while it fits), and after a closed-loop face-detector load (with
the requests answered per second, and the errors: overloaded replies when the memory watchdog sheds
load); each model's load time and memory as the agent measured them (``models/list``). Profiles are applied as given
on this machine: rpi4-1gb here shows its limits at work, not a Raspberry Pi's speed.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import BUNDLED_MODELS_DIR, LocalBroker
from agent.models.devmodels import FACE_INPUT_SHAPE, add_face_detector, copy_bundled_models
from agent.mqtt.localbroker import MosquittoProcess
from agent.tools.client import DeviceClient
from benchmarks.harness import AgentUnderTest, run_load

PROFILES = ("rpi4-1gb", "x86-generic")
FACE_MODEL = "face-detector"
LOAD_INFLIGHT = 4


def _requests(models_dir: Path) -> dict[str, dict[str, Any]]:
    """One valid ``infer`` params per model: the manifest's first example, or a random image for the detector."""
    manifest = json.loads((BUNDLED_MODELS_DIR / "manifest.json").read_text())
    requests = {entry["id"]: {"model": entry["id"], "inputs": entry["examples"][0]["inputs"]} for entry in manifest["models"]}
    image = np.random.default_rng(7).uniform(-1, 1, FACE_INPUT_SHAPE).astype("<f4")
    face_input = {"b64": base64.b64encode(image.tobytes()).decode(), "dtype": "float32", "shape": list(FACE_INPUT_SHAPE)}
    requests[FACE_MODEL] = {"model": FACE_MODEL, "inputs": {"image": face_input}}
    return requests


def measure_profile(broker: MosquittoProcess, workdir: Path, models_dir: Path, profile: str, load_s: float) -> dict[str, Any]:
    """Start one agent under ``profile`` and take every figure from it."""
    device_id = f"bench-{profile}"
    settings = {
        "profile": profile,
        "models_dir": str(models_dir),
        "data_dir": str(workdir / device_id),
        "signing__backend": "none",
        "rate_limit__enabled": "false",
    }
    agent = AgentUnderTest(broker, device_id, settings, workdir / f"{device_id}.log")
    requests = _requests(models_dir)
    try:
        startup_s = agent.start()
        figures: dict[str, Any] = {"startup_s": round(startup_s, 3), "idle": agent.memory_mb(), "with_model": {}}
        with DeviceClient(LocalBroker(host=broker.host, port=broker.port), device_id) as client:
            for model_id, params in requests.items():
                reply = client.call("infer", params, timeout=60)
                if "result" not in reply:
                    raise RuntimeError(f"{profile}: {model_id} failed: {reply.get('error')}")
                figures["with_model"][model_id] = agent.memory_mb()
            listed = client.call("models/list", timeout=30)["result"]["models"]
        payload = workdir / f"{device_id}-face.json"
        payload.write_text(json.dumps({"method": "infer", "params": requests[FACE_MODEL]}))
        load = run_load(broker, device_id, payload, inflight=LOAD_INFLIGHT, duration=load_s, warmup=0.5)
        # Errors here are "overloaded" replies: the memory watchdog shedding load above the soft limit.
        figures["under_load"] = {**agent.memory_mb(), "req_per_s": load["req_per_s"], "errors": load["errors"]}
        figures["models"] = {
            model["id"]: {"load_ms": model["load_ms"], "memory_mb": model["memory_mb"], "loaded": model["loaded"]}
            for model in listed
        }
        figures["limits"] = {key: agent.effective_config()["limits"][key] for key in ("model_memory_mb", "process_soft_limit_mb", "process_memory_mb")}
    finally:
        agent.stop()
    return figures


def run(profiles: tuple[str, ...] = PROFILES, load_s: float = 3.0) -> dict[str, Any]:
    """Every figure for every profile, in a temporary directory with a private broker."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-models-"))
    broker = MosquittoProcess(workdir / "broker", persistence=False)
    try:
        broker.start()
        models_dir = copy_bundled_models(workdir / "models")
        add_face_detector(models_dir, FACE_MODEL)
        return {profile: measure_profile(broker, workdir, models_dir, profile, load_s) for profile in profiles}
    finally:
        broker.close()
        shutil.rmtree(workdir, ignore_errors=True)


def print_table(results: dict[str, Any]) -> None:
    for profile, figures in results.items():
        limits = figures["limits"]
        print(
            f"{profile}: models {limits['model_memory_mb']} MB, soft limit {limits['process_soft_limit_mb']} MB, "
            f"process {limits['process_memory_mb']} MB; started in {figures['startup_s']:.2f} s"
        )
        print(f"  {'state':<34}{'RSS MB':>9}{'peak MB':>9}")
        rows = [("idle", figures["idle"])]
        rows += [(f"+ {model_id} loaded", memory) for model_id, memory in figures["with_model"].items()]
        load = figures["under_load"]
        rows.append((f"face load ({load['req_per_s']:.0f} req/s, {load['errors']} errors)", load))
        for label, memory in rows:
            print(f"  {label:<34}{memory['VmRSS']:>9.1f}{memory['VmHWM']:>9.1f}")
        print(f"  {'model':<34}{'load ms':>9}{'mem MB':>9}")
        for model_id, model in figures["models"].items():
            print(f"  {model_id:<34}{model['load_ms'] or 0:>9.1f}{model['memory_mb'] or 0:>9.1f}")


if __name__ == "__main__":
    print_table(run())

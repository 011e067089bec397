"""Swap pause: the longest gap in answers for a client sending continuously while a new model version goes in.

Run: ``python -m benchmarks.bench_swap``. In-process: one client thread sends ``infer`` requests back to back
straight into the request service (no broker, so the figure is the model manager's pause, not the network's).
Two models: the MediaPipe face detector (224 KB, loads in about 2 ms here) and a generated 24 MB dense model
(the size of a MobileNet: before its first run the file is read and its sha256 checked, tens of milliseconds).
Each round puts a new version in while the client runs:

* ``steady``: nothing changes (the gaps a client sees anyway: scheduling, the collector);
* ``hot_update``: the file and manifest entry written as ``edge-agent models add`` does, then the catalogue
  reloaded: the first request after the swap loads the new version;
* ``warm``: a deployment's ``ModelActivator.warm``: the new version loaded beside the serving one, which
  keeps answering (the gap is what loading beside it costs the client);
* ``activation``: then ``ModelActivator.activate``, the swap: the first request after it finds the new version
  loaded.

The longest gap is taken over the round's window (from just before the change to after it); the table shows
its median and worst over the rounds, beside the median gap between answers and the time the change took.
"""

from __future__ import annotations

import base64
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import Limits
from agent.deploy.activation import ModelActivator
from agent.deploy.staged import StagedModel
from agent.errors import RequestError
from agent.models.authoring import manifest_with_entry, write_atomically, write_manifest
from agent.models.devmodels import FACE_INPUT_SHAPE, add_face_detector
from agent.models.manager import ModelManager
from agent.serving.protocol import Request
from agent.observe.memory import MB
from agent.serving.service import RequestService, Timing
from tests.fixtures.generated_models import SIZED_INPUTS, add_model, sized_model

SIZED_MB = 24
MODELS = ("face-detector", "dense-24mb")
MODES = ("steady", "hot_update", "warm", "activation")
ROUNDS = 9
SETTLE_S = 0.3  # answers before the change, and after it, inside the measured window


class Client:
    """One client sending requests back to back; records when each answer came and any failure."""

    def __init__(self, service: RequestService, model_id: str) -> None:
        self._request = Request(
            jsonrpc="2.0", method="infer", params={"model": model_id, "inputs": _inputs(model_id), "output_encoding": "b64"},
            id=1,
        )
        self._service = service
        self.answered: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-swap-client")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._service.handle(self._request, Timing(received=time.monotonic()))
            except RequestError as exc:
                self.failures.append(exc.message)
                continue
            self.answered.append(time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _inputs(model_id: str) -> dict[str, Any]:
    shape = FACE_INPUT_SHAPE if model_id == "face-detector" else (1, SIZED_INPUTS)
    tensor = np.random.default_rng(7).uniform(-1, 1, shape).astype("<f4")
    name = "image" if model_id == "face-detector" else "x"
    return {name: {"b64": base64.b64encode(tensor.tobytes()).decode(), "dtype": "float32", "shape": list(shape)}}


def _staged(staging: Path, manager: ModelManager, model_id: str, version: str) -> StagedModel:
    """The serving entry as a new version, its file in staging, as a verified bundle leaves it."""
    declared = manager.catalog.declared[model_id]
    staged_file = staging / f"{model_id}-{version}.tflite"
    shutil.copyfile(manager.models_dir / declared.file, staged_file)
    entry = declared.model_copy(update={"version": version, "file": staged_file.name})
    return StagedModel(deployment_id=f"bench-{version}", model_id=model_id, version=version, file=staged_file, entry=entry)


def _hot_update(manager: ModelManager, model_id: str, version: str) -> None:
    """What an operator's copy (or ``models add``) does: a new file, the manifest entry, the watcher's reload."""
    declared = manager.catalog.declared[model_id]
    file = f"{model_id}-{version}.tflite"
    write_atomically(manager.models_dir / file, (manager.models_dir / declared.file).read_bytes())
    entry = declared.model_copy(update={"version": version, "file": file})
    write_manifest(manager.models_dir, manifest_with_entry(manager.models_dir, model_id, entry))
    manager.reload()


def _round(
    mode: str, version: str, manager: ModelManager, activator: ModelActivator, staged: StagedModel
) -> dict[str, Any]:
    service = RequestService(manager, Limits(), device_id="bench", profile="bench")
    client = Client(service, staged.model_id)
    try:
        while len(client.answered) < 20:  # warmed up: the serving version loaded, its interpreters made
            time.sleep(0.01)
        time.sleep(SETTLE_S)
        started = time.monotonic()
        if mode == "hot_update":
            _hot_update(manager, staged.model_id, version)
        elif mode == "warm":
            activator.warm(staged)
        elif mode == "activation":
            activator.activate(staged)
        ended = time.monotonic()
        time.sleep(SETTLE_S)
    finally:
        client.stop()
    window = [moment for moment in client.answered if started - SETTLE_S <= moment <= ended + SETTLE_S]
    gaps = [(later - earlier) * 1000 for earlier, later in zip(window, window[1:])]
    served = manager.catalog.declared[staged.model_id].version
    if mode in ("hot_update", "activation") and served != version:
        raise RuntimeError(f"{mode}: version {version} was not swapped in (serving {served})")
    return {
        "longest_gap_ms": max(gaps),
        "median_gap_ms": statistics.median(gaps),
        "change_ms": (ended - started) * 1000,
        "failed": len(client.failures),
    }


def run(rounds: int = ROUNDS) -> dict[str, Any]:
    """Every mode ``rounds`` times per model, interleaved; the medians and worst cases."""
    results: dict[str, Any] = {"rounds": rounds, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        work = Path(tmp)
        models_dir, staging = work / "models", work / "staging"
        staging.mkdir()
        add_face_detector(models_dir, "face-detector")
        add_model(models_dir, "dense-24mb", sized_model(SIZED_MB), task="sized")
        manager = ModelManager(models_dir, max_concurrent_inferences=2)
        manager.verify_all()
        activator = ModelActivator(manager)
        for model_id in MODELS:
            file_mb = (models_dir / manager.catalog.declared[model_id].file).stat().st_size / MB
            samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for number in range(rounds):
                staged = _staged(staging, manager, model_id, f"deployed-{number}")
                for mode in MODES:
                    version = f"hot-{number}" if mode == "hot_update" else staged.version
                    samples[mode].append(_round(mode, version, manager, activator, staged))
            results["models"][model_id] = {"file_mb": round(file_mb, 2), "modes": _summary(samples)}
    return results


def _summary(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary = {}
    for mode, rows in samples.items():
        longest = [row["longest_gap_ms"] for row in rows]
        summary[mode] = {
            "longest_gap_ms_median": round(statistics.median(longest), 2),
            "longest_gap_ms_max": round(max(longest), 2),
            "median_gap_ms": round(statistics.median(row["median_gap_ms"] for row in rows), 2),
            "change_ms_median": round(statistics.median(row["change_ms"] for row in rows), 1),
            "failed": sum(row["failed"] for row in rows),
        }
    return summary


def print_table(results: dict[str, Any]) -> None:
    print(f"longest gap between answers for one client sending back to back, {results['rounds']} rounds")
    print(f"{'model':<16}{'mode':<12}{'longest gap ms':>16}{'worst':>8}{'median gap ms':>15}{'change ms':>11}{'failed':>8}")
    for model_id, figures in results["models"].items():
        label = f"{model_id}"
        for mode, row in figures["modes"].items():
            print(
                f"{label:<16}{mode:<12}{row['longest_gap_ms_median']:>16.2f}{row['longest_gap_ms_max']:>8.2f}"
                f"{row['median_gap_ms']:>15.2f}{row['change_ms_median']:>11.1f}{row['failed']:>8}"
            )
            label = ""


if __name__ == "__main__":
    figures = run()
    print(json.dumps(figures))
    print_table(figures)

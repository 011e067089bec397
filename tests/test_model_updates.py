"""Hot model updates: new versions dropped into models_dir while clients hammer the service; nothing fails,
each answer comes whole from one version, bad files are refused and the old version keeps serving."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import Limits
from agent.errors import InvalidParams, RequestError
from agent.models.manager import ModelManager
from agent.models.watcher import ModelWatcher
from agent.serving.protocol import Request
from agent.serving.service import RequestService, Timing
from tests.fixtures.generated_models import (
    add_model,
    constant_classifier,
    read_manifest,
    write_manifest,
)

LABELS = ["off", "on"]
X = {"x": [[1.0, 2.0]]}
# What each version answers: a request must see exactly one of these, never a blend.
VERSIONS = {"1.0.0": [0.9, 0.1], "2.0.0": [0.2, 0.8]}


def _infer(service: RequestService, model_id: str) -> dict[str, Any]:
    request = Request(jsonrpc="2.0", method="infer", params={"model": model_id, "inputs": X}, id=1)
    return service.handle(request, Timing(received=time.monotonic()))


def _wait_for(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


class Hammer:
    """Client threads sending requests back to back, recording every answer (or failure) in order."""

    def __init__(self, service: RequestService, model_id: str, threads: int = 3) -> None:
        self.answers: list[list[tuple[str, list[float]]]] = [[] for _ in range(threads)]
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(service, model_id, self.answers[index])) for index in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, service: RequestService, model_id: str, answers: list[tuple[str, list[float]]]) -> None:
        while not self._stop.is_set():
            try:
                result = _infer(service, model_id)
            except RequestError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc.message}")
                continue
            answers.append((result["model_version"], result["outputs"]["probabilities"][0]))

    def latest_versions(self) -> set[str]:
        return {answers[-1][0] for answers in self.answers if answers}

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


@pytest.fixture
def served(tmp_path: Path) -> tuple[RequestService, ModelWatcher]:
    models = tmp_path / "models"
    add_model(models, "switch", constant_classifier(VERSIONS["1.0.0"]), version="1.0.0", labels=LABELS)
    add_model(models, "spare", constant_classifier([0.5, 0.5]), labels=LABELS)
    manager = ModelManager(models, max_concurrent_inferences=2)
    manager.verify_all()
    watcher = ModelWatcher(manager, interval_s=0.05)
    watcher.start()
    yield RequestService(manager, Limits(), device_id="dev1", profile="test"), watcher
    watcher.stop()


def _check_answers(hammer: Hammer) -> None:
    assert hammer.failures == []
    for answers in hammer.answers:
        assert answers, "a client thread got no answer at all"
        for version, probabilities in answers:
            assert probabilities == pytest.approx(VERSIONS[version], abs=1e-6)
        versions = [version for version, _ in answers]
        switched = versions.index("2.0.0") if "2.0.0" in versions else len(versions)
        assert set(versions[:switched]) <= {"1.0.0"} and set(versions[switched:]) <= {"2.0.0"}, "went back to v1"


def test_new_version_is_swapped_in_under_load_and_a_bad_one_is_refused(served: tuple[RequestService, ModelWatcher], caplog: pytest.LogCaptureFixture) -> None:
    service, _ = served
    manager = service.models
    models = manager.models_dir
    hammer = Hammer(service, "switch")
    try:
        assert _wait_for(lambda: all(hammer.answers))
        assert hammer.latest_versions() == {"1.0.0"}
        # The updater writes the new file first, then replaces the manifest (both atomically).
        add_model(models, "switch", constant_classifier(VERSIONS["2.0.0"]), version="2.0.0", labels=LABELS, file="switch-2.tflite")
        assert _wait_for(lambda: hammer.latest_versions() == {"2.0.0"}), "the new version was never served"
        assert _wait_for(lambda: manager.loaded_ids == ["switch"] and manager.memory_used_bytes > 0)

        # A third version whose file does not match its sha256: refused, version 2 keeps serving.
        manifest = read_manifest(models)
        entry = next(model for model in manifest["models"] if model["id"] == "switch")
        (models / "switch-3.tflite").write_bytes(constant_classifier([0.5, 0.5]))
        entry.update(version="3.0.0", file="switch-3.tflite", sha256=hashlib.sha256(b"something else").hexdigest())
        with caplog.at_level("ERROR", logger="agent.models.catalog"):
            write_manifest(models, manifest)
            assert _wait_for(lambda: "still serving version 2.0.0" in caplog.text)
        counts = [len(answers) for answers in hammer.answers]
        assert _wait_for(lambda: all(len(a) > c + 5 for a, c in zip(hammer.answers, counts, strict=True))), (
            f"answers per client {[len(a) for a in hammer.answers]} (from {counts}); failures {hammer.failures[:3]}"
        )
    finally:
        hammer.stop()
    _check_answers(hammer)
    assert manager.entry("switch").version == "2.0.0"
    assert "switch" in manager.servable_ids


def test_removed_models_stop_being_served_and_their_memory_goes(served: tuple[RequestService, ModelWatcher]) -> None:
    service, _ = served
    manager = service.models
    _infer(service, "spare")
    _infer(service, "switch")
    held = manager.memory_used_bytes
    manifest = read_manifest(manager.models_dir)
    manifest["models"] = [model for model in manifest["models"] if model["id"] != "spare"]
    write_manifest(manager.models_dir, manifest)
    assert _wait_for(lambda: "spare" not in manager.servable_ids)
    with pytest.raises(InvalidParams, match="unknown model 'spare'"):
        _infer(service, "spare")
    assert manager.loaded_ids == ["switch"] and manager.memory_used_bytes < held
    assert _infer(service, "switch")["model_version"] == "1.0.0"


def test_a_broken_manifest_keeps_the_previous_catalogue(served: tuple[RequestService, ModelWatcher], caplog: pytest.LogCaptureFixture) -> None:
    service, watcher = served
    watcher.stop()  # polled by hand below, so the broken state is certainly seen
    manager = service.models
    with caplog.at_level("ERROR", logger="agent.models.manager"):
        (manager.models_dir / "manifest.json").write_text('{"models": [')
        assert watcher.poll()
    assert "manifest change refused" in caplog.text
    assert set(manager.servable_ids) == {"switch", "spare"}
    assert _infer(service, "switch")["model_version"] == "1.0.0"
    assert not watcher.poll()  # nothing changed since


def test_a_request_in_flight_finishes_on_the_version_it_started_with(served: tuple[RequestService, ModelWatcher]) -> None:
    service, watcher = served
    watcher.stop()
    manager = service.models
    with manager.lease("switch") as old:
        add_model(manager.models_dir, "switch", constant_classifier(VERSIONS["2.0.0"]), version="2.0.0", labels=LABELS, file="switch-2.tflite")
        assert watcher.poll()
        assert _infer(service, "switch")["model_version"] == "2.0.0"
        outputs = old.run({"x": np.asarray(X["x"], dtype=np.float32)})
        assert outputs["probabilities"][0].tolist() == pytest.approx(VERSIONS["1.0.0"], abs=1e-6)
        assert old.interpreter_count == 1  # still usable while leased
    assert old.interpreter_count == 0 and old.size_bytes == 0  # closed once its last request ended


def test_models_dir_overlays_the_bundled_models_and_a_new_one_appears_without_restart(tmp_path: Path) -> None:
    user = tmp_path / "models"
    user.mkdir()  # a fresh device: no manifest yet, the bundled models alone
    manager = ModelManager.for_limits(user, Limits())
    assert sorted(manager.servable_ids) == ["sensor-state", "vibration-anomaly"]
    add_model(user, "vibration-anomaly", constant_classifier([0.5, 0.25, 0.25]), version="9.0.0",
              labels=["normal", "imbalance", "bearing_wear"])
    add_model(user, "switch", constant_classifier(VERSIONS["2.0.0"]), labels=LABELS)
    assert manager.reload()
    assert sorted(manager.servable_ids) == ["sensor-state", "switch", "vibration-anomaly"]
    assert manager.entry("vibration-anomaly").version == "9.0.0"  # the user's entry wins over the bundled one
    with manager.lease("sensor-state") as loaded:  # bundled files are still found beside the user's
        assert loaded.entry.id == "sensor-state"

"""State per stream for stateful models, with the real microWakeWord "okay_nabu" model (int8, resource
variables): each (client, stream) gets exactly the outputs it would get alone on one fresh interpreter,
however the streams interleave; reset, idle timeout, the bound on streams and model updates start a
stream over, and the reply says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import Limits
from agent.errors import Overloaded
from agent.models.catalog import verified_model_bytes
from agent.models.devmodels import add_wake_word
from agent.models.inference import LoadedModel
from agent.models.manager import ModelManager
from agent.models.streams import ArrivalOrder, StreamTable
from agent.serving.protocol import Request
from agent.serving.service import RequestService, Timing
from tests.fixtures.generated_models import add_model, constant_classifier
from tests.fixtures.real_models import audio_features, wake_word_alone

CHUNKS = len(audio_features(0))


def _service(models: Path) -> RequestService:
    manager = ModelManager(models)
    manager.verify_all()  # as the agent does at start: entries completed from their files
    return RequestService(manager, Limits(), device_id="d", profile="p")


@pytest.fixture
def service(tmp_path: Path) -> RequestService:
    add_wake_word(tmp_path / "models")
    return _service(tmp_path / "models")


def _infer(service: RequestService, client: str, chunk: np.ndarray | None = None, **params: Any) -> dict[str, Any]:
    params = {"model": "okay-nabu", "inputs": {"input_audio": (chunk if chunk is not None else np.zeros((1, 3, 40))).tolist()}, **params}
    request = Request(jsonrpc="2.0", method="infer", params=params, id=1)
    return service.handle(request, Timing(received=time.monotonic()), client)


def _score(result: dict[str, Any]) -> float:
    return float(np.asarray(result["outputs"]["dense_1"]).reshape(-1)[0])


def test_the_wake_word_model_is_detected_as_stateful(service: RequestService) -> None:
    assert service.models.entry("okay-nabu").stateful is True
    [tool] = [tool for tool in _tools(service) if tool["name"] == "okay-nabu"]
    assert {"stream", "reset"} <= set(tool["inputSchema"]["properties"])


def _tools(service: RequestService) -> list[dict[str, Any]]:
    return service.handle(Request(jsonrpc="2.0", method="tools/list", id=1), Timing(received=0.0))["tools"]


def test_interleaved_clients_and_streams_get_exactly_what_each_getswake_word_alone(service: RequestService) -> None:
    streams = {("alice", ""): audio_features(1), ("bob", ""): audio_features(2), ("alice", "mic-2"): audio_features(3)}
    expected = {key: wake_word_alone(chunks) for key, chunks in streams.items()}
    got: dict[tuple[str, str], list[float]] = {key: [] for key in streams}
    for index in range(CHUNKS):
        for (client, stream), chunks in streams.items():
            got[(client, stream)].append(_score(_infer(service, client, chunks[index], stream=stream)))
    assert got == expected
    # Not vacuous: the streams really differ, and one shared interpreter would have mixed them up.
    assert len({tuple(values) for values in expected.values()}) == len(streams)
    shared = wake_word_alone([chunk for index in range(CHUNKS) for chunks in streams.values() for chunk in [chunks[index]]])
    assert shared[0::3] != expected[("alice", "")]


def test_replies_say_when_a_stream_starts_and_reset_starts_it_over(service: RequestService) -> None:
    chunks = audio_features(4)
    first = _infer(service, "alice", chunks[0], stream="s")
    assert first["stream"] == {"id": "s", "reset": True, "reason": "new", "runs": 1}
    second = _infer(service, "alice", chunks[1], stream="s")
    assert second["stream"] == {"id": "s", "reset": False, "runs": 2}
    again = [_infer(service, "alice", chunk, stream="s", reset=index == 0) for index, chunk in enumerate(chunks)]
    assert again[0]["stream"] == {"id": "s", "reset": True, "reason": "requested", "runs": 1}
    assert [_score(result) for result in again] == wake_word_alone(chunks)
    assert any(_score(result) > 0 for result in again)


def test_a_model_update_starts_every_stream_over(tmp_path: Path) -> None:
    models = tmp_path / "models"
    add_wake_word(models)
    service = _service(models)
    chunks = audio_features(5)
    _infer(service, "alice", chunks[0])
    add_wake_word(models, version="3")
    assert service.models.reload()
    after = _infer(service, "alice", chunks[1])
    assert after["stream"]["reason"] == "model_updated" and after["stream"]["runs"] == 1
    assert _score(after) == wake_word_alone(chunks[1:2])[0]


def test_streams_are_bounded_and_a_refused_one_holds_no_place(tmp_path: Path) -> None:
    add_wake_word(tmp_path / "models", streams={"max_streams": 2})
    service = _service(tmp_path / "models")
    _infer(service, "alice")
    _infer(service, "bob")
    with pytest.raises(Overloaded, match="maximum of 2 streams"):
        _infer(service, "carol")
    assert _infer(service, "alice")["stream"]["runs"] == 2
    assert len(service.router.streams) == 2


def _loaded(tmp_path: Path, admit: Callable[[int], bool] | None = None, **fields: Any) -> LoadedModel:
    add_wake_word(tmp_path, **fields)
    manager = ModelManager(tmp_path)
    manager.verify_all()
    entry = manager.entry("okay-nabu")
    return LoadedModel(
        entry, verified_model_bytes(tmp_path, entry), runtime=manager.runtime, admit_growth=admit
    )


def test_idle_streams_expire_their_memory_with_them(tmp_path: Path) -> None:
    now = [0.0]
    table = StreamTable(clock=lambda: now[0])
    loaded = _loaded(tmp_path, streams={"idle_timeout_s": 60})
    pool_only = loaded.memory_bytes
    feeds = {"input_audio": np.zeros((1, 3, 40), dtype=np.int8)}
    table.run(loaded, "alice", "", feeds, received=0.0)
    table.run(loaded, "bob", "", feeds, received=0.0)
    assert loaded.interpreter_count == 3 and loaded.memory_bytes > pool_only
    now[0] = 61.0
    assert table.sweep() == 2
    assert loaded.memory_bytes == pool_only and len(table) == 0
    _, report = table.run(loaded, "alice", "", feeds, received=62.0)
    assert (report.reset, report.reason) == (True, "expired")


def test_an_unloaded_models_streams_free_their_memory_and_the_next_run_says_why(tmp_path: Path) -> None:
    now = [0.0]
    table = StreamTable(clock=lambda: now[0])
    loaded = _loaded(tmp_path)
    feeds = {"input_audio": np.zeros((1, 3, 40), dtype=np.int8)}
    for client in ("alice", "bob", "carol"):
        table.run(loaded, client, "", feeds, received=0.0)
    assert loaded.interpreter_count == 4
    loaded.close()  # unloaded to make room: the budget no longer counts it, so its streams must not hold memory
    assert table.sweep() == 0 and loaded.interpreter_count == 0 and len(table) == 3
    again = LoadedModel(loaded.entry, verified_model_bytes(tmp_path, loaded.entry), runtime=loaded.runtime)
    _, report = table.run(again, "alice", "", feeds, received=1.0)
    assert (report.reset, report.reason, report.runs) == (True, "model_reloaded", 1)
    updated = LoadedModel(
        loaded.entry.model_copy(update={"version": "3"}), verified_model_bytes(tmp_path, loaded.entry), runtime=loaded.runtime
    )
    _, report = table.run(updated, "bob", "", feeds, received=2.0)
    assert report.reason == "model_updated"


def test_a_reload_to_make_room_starts_the_stream_over_and_says_so(service: RequestService) -> None:
    chunks = audio_features(6)
    _infer(service, "alice", chunks[0])
    assert service.models.unload_idle() == 1
    after = _infer(service, "alice", chunks[1])
    assert after["stream"] == {"id": "", "reset": True, "reason": "model_reloaded", "runs": 1}
    assert _score(after) == wake_word_alone(chunks[1:2])[0]


def test_a_stream_needs_room_in_the_model_budget(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, admit=lambda estimated: False)
    table = StreamTable()
    with pytest.raises(Overloaded, match="no memory left"):
        table.run(loaded, "alice", "", {"input_audio": np.zeros((1, 3, 40), dtype=np.int8)}, received=0.0)
    assert len(table) == 0


def test_stateless_models_keep_pooled_interpreters(tmp_path: Path) -> None:
    add_model(tmp_path, "steady", constant_classifier([0.25, 0.75]), labels=["a", "b"])
    service = _service(tmp_path)
    request = Request(jsonrpc="2.0", method="infer", params={"model": "steady", "inputs": {"x": [[0.0, 0.0]]}, "stream": "s"}, id=1)
    result = service.handle(request, Timing(received=0.0), "alice")
    assert "stream" not in result and len(service.router.streams) == 0


def test_a_request_waits_for_its_clients_earlier_requests_to_reach_their_place() -> None:
    order = ArrivalOrder()
    order.taken("alice", 1.0)
    order.taken("bob", 0.5)
    order.taken("alice", 2.0)
    passed = threading.Event()
    later = threading.Thread(target=lambda: (order.wait_for_earlier("alice", 2.0), passed.set()))
    later.start()
    order.wait_for_earlier("alice", 1.0)  # nothing of alice's arrived before it
    order.placed("bob", 0.5)  # another client's request changes nothing for alice's
    assert not passed.is_set()
    order.placed("alice", 1.0)
    later.join(10)
    assert passed.is_set()
    order.finished("alice", 1.0)
    order.finished("alice", 2.0)
    order.finished("bob", 0.5)
    order.wait_for_earlier("alice", 3.0)

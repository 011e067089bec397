"""Task routing and ensembles through the real request service, with real generated classifiers whose
outputs are known, so the vote can be checked against numbers computed by hand."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import Limits
from agent.errors import InvalidParams, ModelError, ModelTooLarge
from agent.models.catalog import load_manifest
from agent.models.manager import ModelManager
from agent.serving.protocol import Request
from agent.serving.service import RequestService, Timing
from tests.fixtures.generated_models import (
    add_ensemble,
    add_model,
    constant_classifier,
    sized_model,
)

LABELS = ["cat", "dog", "bird"]
X = {"x": [[0.5, -0.5]]}


def _service(models: Path, budget_mb: int | None = None) -> RequestService:
    manager = ModelManager(models, memory_budget_mb=budget_mb)
    manager.verify_all()
    return RequestService(manager, Limits(), device_id="dev1", profile="test")


def _call(service: RequestService, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return service.handle(Request(jsonrpc="2.0", method=method, params=params, id=1), Timing(received=time.monotonic()))


def _classifier(models: Path, model_id: str, probabilities: list[float], **fields: Any) -> None:
    add_model(models, model_id, constant_classifier(probabilities, description=model_id), task="animals", labels=LABELS, **fields)


@pytest.fixture
def voters(tmp_path: Path) -> Path:
    """Three classifiers that always answer the same, and two ensembles over them."""
    models = tmp_path / "models"
    _classifier(models, "a", [0.7, 0.2, 0.1])
    _classifier(models, "b", [0.1, 0.6, 0.3])
    _classifier(models, "c", [0.2, 0.5, 0.3])
    add_ensemble(models, "vote", "weighted_vote", {"a": 3.0, "b": 1.0, "c": 1.0}, task="animals")
    add_ensemble(models, "quickest", "fastest", {"a": 1.0, "b": 1.0, "c": 1.0}, task="animals")
    return models


def test_weighted_vote_averages_probabilities_with_the_weights(voters: Path) -> None:
    service = _service(voters)
    result = _call(service, "infer", {"model": "vote", "inputs": X})
    # (3*[.7 .2 .1] + [.1 .6 .3] + [.2 .5 .3]) / 5 = [2.4 1.7 .9] / 5; a plain majority of argmaxes would say dog.
    assert result["outputs"]["probabilities"][0] == pytest.approx([0.48, 0.34, 0.18], abs=1e-6)
    assert [item["label"] for item in result["top"]] == ["cat", "dog", "bird"]
    assert result["model"] == "vote" and result["model_version"] == "1"
    members = result["ensemble"]["members"]
    assert result["ensemble"]["strategy"] == "weighted_vote"
    assert [(m["model"], m["weight"], m["model_version"]) for m in members] == [("a", 3.0, "1.0.0"), ("b", 1.0, "1.0.0"), ("c", 1.0, "1.0.0")]


def test_equal_weights_vote_and_raw_outputs_are_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _classifier(models, "a", [0.7, 0.2, 0.1])
    _classifier(models, "b", [0.1, 0.6, 0.3])
    _classifier(models, "c", [0.2, 0.5, 0.3])
    add_ensemble(models, "even", "weighted_vote", {"a": 1.0, "b": 1.0, "c": 1.0}, task="animals")
    service = _service(models)
    result = _call(service, "infer", {"model": "even", "inputs": X})
    assert result["outputs"]["probabilities"][0] == pytest.approx([1.0 / 3, 1.3 / 3, 0.7 / 3], abs=1e-6)
    assert result["top"][0]["label"] == "dog"
    with pytest.raises(InvalidParams, match="raw"):
        _call(service, "infer", {"model": "even", "inputs": X, "raw": True})


def test_fastest_runs_each_member_once_then_the_lowest_measured_latency(voters: Path) -> None:
    service = _service(voters)
    manager = service.models
    first_rounds = [_call(service, "infer", {"model": "quickest", "inputs": X}) for _ in range(3)]
    assert [r["ensemble"]["members"][0]["model"] for r in first_rounds] == ["a", "b", "c"]
    assert first_rounds[1]["outputs"]["probabilities"][0] == pytest.approx([0.1, 0.6, 0.3], abs=1e-6)
    for _ in range(5):
        latencies = {m: manager.measurements.latency_ms(m, manager.entry(m).sha256) for m in "abc"}
        served = _call(service, "infer", {"model": "quickest", "inputs": X})["ensemble"]["members"][0]["model"]
        assert served == min(latencies, key=lambda m: latencies[m])


def test_task_routing_prefers_accuracy_then_priority_and_skips_what_cannot_fit(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _classifier(models, "plain", [0.6, 0.3, 0.1], accuracy=0.9)
    _classifier(models, "favoured", [0.1, 0.8, 0.1], accuracy=0.9, priority=5)
    _classifier(models, "guess", [0.4, 0.4, 0.2])
    add_model(models, "huge", sized_model(12), task="animals", labels=LABELS, accuracy=0.99)
    service = _service(models, budget_mb=8)
    result = _call(service, "infer", {"task": "animals", "inputs": X})
    assert result["model"] == "favoured" and result["task"] == "animals"
    assert result["top"][0]["label"] == "dog"
    assert service.models.loaded_ids == ["favoured"]
    with pytest.raises(ModelTooLarge, match="8 MB"):
        _call(service, "infer", {"model": "huge", "inputs": {"x": [[0.0] * 256]}})


def test_task_routing_breaks_ties_by_measured_latency_and_can_pick_an_ensemble(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _classifier(models, "one", [0.6, 0.3, 0.1])
    _classifier(models, "two", [0.1, 0.8, 0.1])
    service = _service(models)
    manager = service.models
    for model_id in ("one", "two"):
        _call(service, "infer", {"model": model_id, "inputs": X})
    latencies = {m: manager.measurements.latency_ms(m, manager.entry(m).sha256) for m in ("one", "two")}
    assert _call(service, "infer", {"task": "animals", "inputs": X})["model"] == min(latencies, key=lambda m: latencies[m])

    add_ensemble(models, "panel", "weighted_vote", {"one": 1.0, "two": 1.0}, task="animals", accuracy=0.97)
    manager.reload()
    routed = _call(service, "infer", {"task": "animals", "inputs": X})
    assert routed["model"] == "panel" and routed["outputs"]["probabilities"][0] == pytest.approx([0.35, 0.55, 0.1], abs=1e-6)


def test_routing_errors_name_what_is_served(voters: Path) -> None:
    service = _service(voters)
    with pytest.raises(InvalidParams, match="tasks served: animals"):
        _call(service, "infer", {"task": "plants", "inputs": X})
    with pytest.raises(InvalidParams, match="does 'animals', not task 'plants'"):
        _call(service, "infer", {"model": "a", "task": "plants", "inputs": X})
    with pytest.raises(InvalidParams, match="model or params.task"):
        _call(service, "infer", {"inputs": X})


def test_models_list_and_tools_list_include_ensembles(voters: Path) -> None:
    service = _service(voters)
    _call(service, "infer", {"model": "a", "inputs": X})
    listed = {m["id"]: m for m in _call(service, "models/list")["models"]}
    assert listed["vote"]["kind"] == "ensemble" and listed["vote"]["strategy"] == "weighted_vote"
    assert listed["vote"]["members"] == [{"model": "a", "weight": 3.0}, {"model": "b", "weight": 1.0}, {"model": "c", "weight": 1.0}]
    assert listed["vote"]["labels"] == LABELS and listed["vote"]["outputs"][0]["shape"] == [1, 3]
    assert listed["a"]["kind"] == "model" and listed["a"]["loaded"] and listed["a"]["memory_mb"] is not None
    assert listed["b"]["loaded"] is False and listed["b"]["latency_ms"] is None
    tools = {tool["name"]: tool for tool in _call(service, "tools/list")["tools"]}
    assert set(tools) == {"a", "b", "c", "vote", "quickest"}
    assert tools["vote"]["inputSchema"] == tools["a"]["inputSchema"]
    called = _call(service, "tools/call", {"name": "vote", "arguments": X})
    assert called["isError"] is False and called["structuredContent"]["top"][0]["label"] == "cat"
    assert called["structuredContent"]["ensemble"]["strategy"] == "weighted_vote"


@pytest.mark.parametrize(
    ("members", "fields", "problem"),
    [
        ({"a": 1.0, "nope": 1.0}, {"task": "animals"}, "not models of this manifest"),
        ({"a": 1.0, "other": 1.0}, {"task": "animals"}, "every member must have task 'animals'"),
        ({"a": 1.0, "relabelled": 1.0}, {"task": "animals"}, "same non-empty labels"),
    ],
)
def test_invalid_ensembles_make_the_manifest_invalid(tmp_path: Path, members: dict[str, float], fields: dict[str, Any], problem: str) -> None:
    models = tmp_path / "models"
    _classifier(models, "a", [0.7, 0.2, 0.1])
    add_model(models, "other", constant_classifier([0.5, 0.5, 0.0001]), task="weather", labels=LABELS)
    add_model(models, "relabelled", constant_classifier([0.5, 0.4, 0.1]), task="animals", labels=["x", "y", "z"])
    add_ensemble(models, "bad", "weighted_vote", members, **fields)
    with pytest.raises(ModelError, match=problem):
        load_manifest(models)

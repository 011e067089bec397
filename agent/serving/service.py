"""The request use case: a parsed JSON-RPC request in, a reply dict out (no MQTT in here).

Methods: ``infer``, ``models/list``, ``ping`` and the Model Context Protocol methods (``initialize``,
``notifications/initialized``, ``tools/list``, ``tools/call``) so an MCP host can use each model, and each
ensemble, as a tool. Which model serves an ``infer`` is decided by :mod:`agent.serving.routing`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent import __version__
from agent.config import Limits
from agent.errors import InvalidParams, MethodNotFound, RequestError
from agent.models.catalog import Catalog, EnsembleEntry, ModelEntry, TensorSpec
from agent.models.heads import detections, top_labels
from agent.models.inference import encode_b64_tensor
from agent.models.manager import ModelManager
from agent.models.stats import ModelStats
from agent.models.taskspec import DetectionHead
from agent.observe.memory import MB
from agent.serving.mcp_tools import TOOL_OPTIONS, summary, tool_for, tool_for_ensemble
from agent.serving.protocol import InferParams, Request, ToolCallParams, validate_params
from agent.serving.routing import VOTE_OUTPUT, Call, Router, Served

MCP_PROTOCOL_VERSIONS = ("2026-07-28", "2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
# The newest version that still negotiates with an initialize handshake, for clients asking something unknown.
MCP_HANDSHAKE_FALLBACK = "2025-11-25"
SERVER_INFO = {"name": "edge-agent", "version": __version__}


@dataclass
class Timing:
    """Monotonic timestamps of one request's life, for ``timing_ms`` and metrics."""

    received: float
    started: float = 0.0
    inference_ms: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def as_result(self) -> dict[str, float]:
        now = time.monotonic()
        result = {"queue": round((self.started - self.received) * 1000, 3), "inference": round(self.inference_ms, 3)}
        if self.extra:  # most requests have none: no comprehension to build and unpack for them
            result.update((name, round(ms, 3)) for name, ms in self.extra.items())
        result["total"] = round((now - self.received) * 1000, 3)
        return result


class RequestService:
    """Runs requests against the model manager; every method returns a JSON-RPC ``result`` dict."""

    def __init__(self, models: ModelManager, limits: Limits, *, device_id: str, profile: str) -> None:
        self.models = models
        self.router = Router(
            models, max_input_elements=limits.max_input_elements, max_image_pixels=limits.max_image_pixels
        )
        self.limits = limits
        self.device_id = device_id
        self.profile = profile
        self._methods: dict[str, Callable[[Any, Timing, str], dict[str, Any]]] = {
            "infer": self._infer,
            "models/list": self._models_list,
            "ping": lambda params, timing, client_id: {},
            "initialize": self._initialize,
            "notifications/initialized": lambda params, timing, client_id: {},
            "tools/list": self._tools_list,
            "tools/call": self._tools_call,
        }

    @property
    def methods(self) -> frozenset[str]:
        """The JSON-RPC methods this service answers."""
        return frozenset(self._methods)

    def handle(self, request: Request, timing: Timing, client_id: str = "") -> dict[str, Any]:
        """The ``result`` of a request from ``client_id``; raises a RequestError subclass for an error reply."""
        method = self._methods.get(request.method)
        if method is None:
            raise MethodNotFound(f"unknown method {request.method!r}")
        return method(request.params, timing, client_id)

    def run_inference(self, params: InferParams, timing: Timing, client_id: str = "") -> dict[str, Any]:
        """Run the model (or ensemble) named, or the best one for the task named, and shape the ``infer`` result."""
        target = self.router.resolve(params.model, params.task)
        image = params.image.b64 if params.image is not None else None
        call = Call(client_id, timing.received, params.stream, params.reset, image)
        served = self.router.serve(target, params.inputs, raw=params.raw, call=call)
        timing.inference_ms = served.inference_ms
        run = served.run
        if run is not None and run.preprocess_ms:
            timing.extra["preprocess"] = run.preprocess_ms
        head = run.entry.head if run is not None else None
        # A detection head reads real values: raw integers are returned as tensors.
        detection = isinstance(head, DetectionHead) and not params.raw
        result: dict[str, Any] = {"model": served.id, "model_version": served.version, "served_by": "local"}
        if not detection or params.raw_outputs:
            # Non-finite values stay floats here; the publisher encodes them (agent.outgoing).
            result["outputs"] = {
                name: encode_b64_tensor(np.asarray(array)) if params.output_encoding == "b64" else np.asarray(array).tolist()
                for name, array in served.outputs.items()
            }
        if detection:
            assert isinstance(head, DetectionHead)
            result["detections"] = _detections(head, served, params)
        if run is not None and run.stream is not None:
            result["stream"] = run.stream.as_result()
        if params.model is None:
            result["task"] = params.task
        if served.strategy is not None:
            result["ensemble"] = {
                "strategy": served.strategy,
                "members": [
                    {
                        "model": run.entry.id,
                        "model_version": run.entry.version,
                        "weight": weight,
                        "inference_ms": round(run.inference_ms, 3),
                    }
                    for run, weight in served.members
                ],
            }
        first_output = next(iter(served.outputs.values()), None)
        top = None if detection or first_output is None else top_labels(served.labels, first_output, params.top_k)
        if top is not None:
            result["top"] = top
        result["timing_ms"] = timing.as_result()
        return result

    def _infer(self, params: Any, timing: Timing, client_id: str) -> dict[str, Any]:
        return self.run_inference(validate_params(InferParams, params), timing, client_id)

    def _models_list(self, params: Any, timing: Timing, client_id: str) -> dict[str, Any]:
        catalog = self.models.catalog
        models = [
            _describe_model(entry, self.models.stats(entry), self.models.accelerator_report(entry))
            for entry in catalog.models.values()
        ]
        ensembles = [_describe_ensemble(ensemble, catalog) for ensemble in catalog.ensembles.values()]
        return {"models": models + ensembles, "runtime": self.models.runtime.name}

    def _initialize(self, params: Any, timing: Timing, client_id: str) -> dict[str, Any]:
        requested = params.get("protocolVersion") if isinstance(params, dict) else None
        version = requested if requested in MCP_PROTOCOL_VERSIONS else MCP_HANDSHAKE_FALLBACK
        return {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": SERVER_INFO,
            "instructions": (
                f"Each tool runs one TensorFlow Lite model on device {self.device_id!r}. "
                "Pass every input as a nested list of numbers with the shape its schema gives, "
                "or a picture as image.b64 (JPEG or PNG) where the schema asks for one."
            ),
        }

    def _tools_list(self, params: Any, timing: Timing, client_id: str) -> dict[str, Any]:
        catalog = self.models.catalog
        tools = [tool_for(entry) for entry in catalog.models.values()]
        tools += [tool_for_ensemble(ensemble, catalog) for ensemble in catalog.ensembles.values()]
        return {"tools": tools}

    def _tools_call(self, params: Any, timing: Timing, client_id: str) -> dict[str, Any]:
        call = validate_params(ToolCallParams, params)
        catalog = self.models.catalog
        if call.name not in catalog.models and call.name not in catalog.ensembles:
            raise InvalidParams(f"unknown tool {call.name!r}")
        arguments = dict(call.arguments)
        options = {key: arguments.pop(key) for key in TOOL_OPTIONS if key in arguments}
        try:
            infer = validate_params(InferParams, {"model": call.name, "inputs": arguments, **options})
            result = self.run_inference(infer, timing, client_id)
        except RequestError as exc:
            if isinstance(exc, InvalidParams):
                return {"content": [{"type": "text", "text": exc.message}], "isError": True}
            raise
        kept = ("model", "model_version", "ensemble", "outputs", "top", "detections", "stream", "timing_ms")
        structured = {key: result[key] for key in kept if key in result}
        return {
            "content": [{"type": "text", "text": summary(result)}],
            "structuredContent": structured,
            "isError": False,
        }


def _describe_tensor(spec: TensorSpec) -> dict[str, Any]:
    return spec.model_dump(exclude_none=True)


def _describe_model(entry: ModelEntry, stats: ModelStats, accelerator: dict[str, str | None]) -> dict[str, Any]:
    return {
        "id": entry.id,
        "kind": "model",
        "version": entry.version,
        "task": entry.task,
        "description": entry.description,
        "labels": entry.labels,
        "inputs": [_describe_tensor(spec) for spec in entry.inputs],
        "outputs": [_describe_tensor(spec) for spec in entry.outputs],
        "head": entry.head.model_dump(exclude_none=True) if entry.head is not None else None,
        "stateful": bool(entry.stateful),
        "pinned": entry.pinned,
        "loaded": stats.loaded,
        "memory_mb": None if stats.memory_bytes is None else round(stats.memory_bytes / MB, 1),
        "latency_ms": None if stats.latency_ms is None else round(stats.latency_ms, 3),
        "load_ms": None if stats.load_ms is None else round(stats.load_ms, 1),
        "accelerator": accelerator,
    }


def _ensemble_outputs(ensemble: EnsembleEntry, first: ModelEntry) -> list[TensorSpec]:
    if ensemble.strategy == "fastest":
        return first.outputs
    description = f"weighted mean of the members' probabilities in label order: {', '.join(first.labels)}"
    return [TensorSpec(name=VOTE_OUTPUT, description=description, shape=[1, len(first.labels)], dtype="float32")]


def _describe_ensemble(ensemble: EnsembleEntry, catalog: Catalog) -> dict[str, Any]:
    """An ensemble as ``models/list`` shows it: the fields of a model, plus its strategy and members."""
    first = catalog.models[ensemble.members[0].model]
    return {
        "id": ensemble.id,
        "kind": "ensemble",
        "version": ensemble.version,
        "task": ensemble.task,
        "description": ensemble.description,
        "labels": first.labels,
        "inputs": [_describe_tensor(spec) for spec in first.inputs],
        "outputs": [_describe_tensor(spec) for spec in _ensemble_outputs(ensemble, first)],
        "strategy": ensemble.strategy,
        "members": [member.model_dump() for member in ensemble.members],
    }


def _detections(head: DetectionHead, served: Served, params: InferParams) -> list[dict[str, Any]]:
    run = served.run
    assert run is not None
    threshold = head.score_threshold if params.score_threshold is None else params.score_threshold
    limit = min(params.max_detections or head.max_detections, head.max_detections)
    return detections(
        head, run.entry.labels, list(run.outputs.values()), run.frame, run.input_hw,
        score_threshold=threshold, max_detections=limit,
    )

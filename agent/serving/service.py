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
from agent.models.inference import encode_b64_tensor
from agent.models.manager import ModelManager
from agent.models.stats import ModelStats
from agent.observe.memory import MB
from agent.serving.protocol import InferParams, Request, ToolCallParams, validate_params
from agent.serving.routing import VOTE_OUTPUT, Router

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
        return {
            "queue": round((self.started - self.received) * 1000, 3),
            "inference": round(self.inference_ms, 3),
            "total": round((now - self.received) * 1000, 3),
        }


class RequestService:
    """Runs requests against the model manager; every method returns a JSON-RPC ``result`` dict."""

    def __init__(self, models: ModelManager, limits: Limits, *, device_id: str, profile: str) -> None:
        self.models = models
        self.router = Router(models, max_input_elements=limits.max_input_elements)
        self.limits = limits
        self.device_id = device_id
        self.profile = profile
        self._methods: dict[str, Callable[[Any, Timing], dict[str, Any]]] = {
            "infer": self._infer,
            "models/list": self._models_list,
            "ping": lambda params, timing: {},
            "initialize": self._initialize,
            "notifications/initialized": lambda params, timing: {},
            "tools/list": self._tools_list,
            "tools/call": self._tools_call,
        }

    @property
    def methods(self) -> frozenset[str]:
        """The JSON-RPC methods this service answers."""
        return frozenset(self._methods)

    def handle(self, request: Request, timing: Timing) -> dict[str, Any]:
        """The ``result`` of a request; raises a RequestError subclass for an error reply."""
        method = self._methods.get(request.method)
        if method is None:
            raise MethodNotFound(f"unknown method {request.method!r}")
        return method(request.params, timing)

    def run_inference(self, params: InferParams, timing: Timing) -> dict[str, Any]:
        """Run the model (or ensemble) named, or the best one for the task named, and shape the ``infer`` result."""
        target = self.router.resolve(params.model, params.task)
        served = self.router.serve(target, params.inputs, raw=params.raw)
        timing.inference_ms = served.inference_ms
        result: dict[str, Any] = {
            "model": served.id,
            "model_version": served.version,
            "served_by": "local",
            # Non-finite values stay floats here; the publisher encodes them (agent.outgoing).
            "outputs": {
                name: encode_b64_tensor(np.asarray(array)) if params.output_encoding == "b64" else np.asarray(array).tolist()
                for name, array in served.outputs.items()
            },
        }
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
        top = _top_labels(served.labels, served.outputs, params.top_k)
        if top is not None:
            result["top"] = top
        result["timing_ms"] = timing.as_result()
        return result

    def _infer(self, params: Any, timing: Timing) -> dict[str, Any]:
        return self.run_inference(validate_params(InferParams, params), timing)

    def _models_list(self, params: Any, timing: Timing) -> dict[str, Any]:
        catalog = self.models.catalog
        models = [
            _describe_model(entry, self.models.stats(entry), self.models.accelerator_report(entry))
            for entry in catalog.models.values()
        ]
        ensembles = [_describe_ensemble(ensemble, catalog) for ensemble in catalog.ensembles.values()]
        return {"models": models + ensembles, "runtime": self.models.runtime.name}

    def _initialize(self, params: Any, timing: Timing) -> dict[str, Any]:
        requested = params.get("protocolVersion") if isinstance(params, dict) else None
        version = requested if requested in MCP_PROTOCOL_VERSIONS else MCP_HANDSHAKE_FALLBACK
        return {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": SERVER_INFO,
            "instructions": (
                f"Each tool runs one TensorFlow Lite model on device {self.device_id!r}. "
                "Pass every input as a nested list of numbers with the shape its schema gives."
            ),
        }

    def _tools_list(self, params: Any, timing: Timing) -> dict[str, Any]:
        catalog = self.models.catalog
        tools = [_tool_for(entry) for entry in catalog.models.values()]
        tools += [_tool_for_ensemble(ensemble, catalog) for ensemble in catalog.ensembles.values()]
        return {"tools": tools}

    def _tools_call(self, params: Any, timing: Timing) -> dict[str, Any]:
        call = validate_params(ToolCallParams, params)
        catalog = self.models.catalog
        if call.name not in catalog.models and call.name not in catalog.ensembles:
            raise InvalidParams(f"unknown tool {call.name!r}")
        arguments = dict(call.arguments)
        options = {key: arguments.pop(key) for key in ("raw", "top_k") if key in arguments}
        try:
            infer = validate_params(InferParams, {"model": call.name, "inputs": arguments, **options})
            result = self.run_inference(infer, timing)
        except RequestError as exc:
            if isinstance(exc, InvalidParams):
                return {"content": [{"type": "text", "text": exc.message}], "isError": True}
            raise
        structured = {key: result[key] for key in ("model", "model_version", "ensemble", "outputs", "top", "timing_ms") if key in result}
        return {
            "content": [{"type": "text", "text": _summary(result)}],
            "structuredContent": structured,
            "isError": False,
        }


def _top_labels(labels: list[str], outputs: dict[str, np.ndarray], top_k: int) -> list[dict[str, Any]] | None:
    if not labels or top_k == 0 or not outputs:
        return None
    scores = np.asarray(next(iter(outputs.values()))).reshape(-1).tolist()
    if len(scores) != len(labels):
        return None
    # Plain Python: for a handful of labels this is several times cheaper than numpy's argsort.
    order = sorted(range(len(scores)), key=lambda index: -scores[index])[:top_k]
    return [{"label": labels[index], "score": round(float(scores[index]), 6)} for index in order]


def _summary(result: dict[str, Any]) -> str:
    if "top" in result:
        ranked = ", ".join(f"{item['label']} {item['score']:.3f}" for item in result["top"])
        return f"{result['model']} {result['model_version']}: {ranked}"
    shapes = ", ".join(f"{name} {list(np.shape(value))}" for name, value in result["outputs"].items())
    return f"{result['model']} {result['model_version']}: outputs {shapes}"


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


def _array_schema(shape: list[int], description: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number"}
    for dim in reversed(shape):
        schema = {"type": "array", "items": schema}
        if dim > 0:
            schema.update(minItems=dim, maxItems=dim)
    schema["description"] = description
    return schema


def _tool(name: str, version: str, description: str, labels: list[str], inputs: list[TensorSpec]) -> dict[str, Any]:
    properties = {
        spec.name: _array_schema(spec.shape or [], spec.description or f"input tensor {spec.name}") for spec in inputs
    }
    properties["top_k"] = {"type": "integer", "minimum": 0, "maximum": 1000, "description": "how many labels to rank"}
    properties["raw"] = {"type": "boolean", "description": "quantized models: pass and return raw integers"}
    if labels:
        description += f" Labels: {', '.join(labels)}."
    return {
        "name": name,
        "title": f"{name} {version}",
        "description": description,
        "inputSchema": {
            "type": "object",
            "properties": properties,
            "required": [spec.name for spec in inputs],
            "additionalProperties": False,
        },
    }


def _tool_for(entry: ModelEntry) -> dict[str, Any]:
    description = entry.description or f"Run model {entry.id}"
    return _tool(entry.id, entry.version, description, entry.labels, entry.inputs)


def _tool_for_ensemble(ensemble: EnsembleEntry, catalog: Catalog) -> dict[str, Any]:
    first = catalog.models[ensemble.members[0].model]
    members = ", ".join(member.model for member in ensemble.members)
    how = "the fastest of" if ensemble.strategy == "fastest" else "a weighted vote of"
    description = ensemble.description or f"Run {how} {members}."
    return _tool(ensemble.id, ensemble.version, description, first.labels, first.inputs)

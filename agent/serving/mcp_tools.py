"""Each model and ensemble as a Model Context Protocol tool: its input schema (tensors, or a picture for a
model with an image input, plus the options its head and state take), its output schema (what
``structuredContent`` holds for its head) and the one-line text summary of a result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.models.catalog import Catalog, EnsembleEntry, ModelEntry, TensorSpec
from agent.models.taskspec import DetectionHead

# tools/call arguments that are request options, not input tensors.
TOOL_OPTIONS = ("raw", "top_k", "image", "stream", "reset", "raw_outputs", "score_threshold", "max_detections")

_DETECTION_SCHEMA: dict[str, Any] = {
    "type": "array",
    "description": "objects found, best first; box and keypoints in 0..1 of the picture",
    "items": {
        "type": "object",
        "properties": {
            "label": {"type": "string"},
            "score": {"type": "number"},
            "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                    "description": "x_min, y_min, x_max, y_max"},
            "keypoints": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        },
        "required": ["label", "score", "box"],
    },
}
_TOP_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "object", "properties": {"label": {"type": "string"}, "score": {"type": "number"}},
              "required": ["label", "score"]},
}


def summary(result: dict[str, Any]) -> str:
    """One line for an MCP host: the ranked labels, the detections, or the output shapes."""
    head = f"{result['model']} {result['model_version']}"
    if "detections" in result:
        found = ", ".join(
            f"{item['label']} {item['score']:.2f} at {[round(v, 3) for v in item['box']]}" for item in result["detections"]
        )
        return f"{head}: {len(result['detections'])} detection(s){': ' + found if found else ''}"
    if "top" in result:
        ranked = ", ".join(f"{item['label']} {item['score']:.3f}" for item in result["top"])
        return f"{head}: {ranked}"
    shapes = ", ".join(f"{name} {list(np.shape(value))}" for name, value in result["outputs"].items())
    return f"{head}: outputs {shapes}"


def tool_for(entry: ModelEntry) -> dict[str, Any]:
    """A model's tool."""
    return _tool(entry.id, entry.version, entry.description or f"Run model {entry.id}", entry, entry.inputs)


def tool_for_ensemble(ensemble: EnsembleEntry, catalog: Catalog) -> dict[str, Any]:
    """An ensemble's tool: its first member's inputs, its strategy in the description."""
    first = catalog.models[ensemble.members[0].model]
    members = ", ".join(member.model for member in ensemble.members)
    how = "the fastest of" if ensemble.strategy == "fastest" else "a weighted vote of"
    description = ensemble.description or f"Run {how} {members}."
    return _tool(ensemble.id, ensemble.version, description, first, first.inputs)


def _array_schema(shape: list[int], description: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number"}
    for dim in reversed(shape):
        schema = {"type": "array", "items": schema}
        if dim > 0:
            schema.update(minItems=dim, maxItems=dim)
    schema["description"] = description
    return schema


def _tool(name: str, version: str, description: str, model: ModelEntry, inputs: list[TensorSpec]) -> dict[str, Any]:
    detection = isinstance(model.head, DetectionHead)
    # Sentences are appended below: a description from a manifest or TFLite Metadata may end without a stop.
    if description and not description.endswith((".", "!", "?")):
        description += "."
    properties: dict[str, Any] = {}
    required = []
    for spec in inputs:
        if spec.preprocess is not None:
            properties["image"] = {
                "type": "object",
                "properties": {"b64": {"type": "string", "contentEncoding": "base64", "description": "JPEG or PNG bytes"}},
                "required": ["b64"],
                "additionalProperties": False,
                "description": f"a picture for input {spec.name} (resized to {spec.shape}, {spec.preprocess.resize})",
            }
            required.append("image")
        else:
            properties[spec.name] = _array_schema(spec.shape or [], spec.description or f"input tensor {spec.name}")
            required.append(spec.name)
    if detection:
        properties["score_threshold"] = {"type": "number", "minimum": 0, "maximum": 1, "description": "lowest score reported"}
        properties["max_detections"] = {"type": "integer", "minimum": 1, "description": "most detections reported"}
        properties["raw_outputs"] = {"type": "boolean", "description": "also return the raw output tensors"}
    else:
        properties["top_k"] = {"type": "integer", "minimum": 0, "maximum": 1000, "description": "how many labels to rank"}
    properties["raw"] = {"type": "boolean", "description": "quantized models: pass and return raw integers"}
    if model.stateful:
        properties["stream"] = {"type": "string", "maxLength": 128, "description": "one state per stream of yours"}
        properties["reset"] = {"type": "boolean", "description": "start the stream over from a fresh state"}
        description += " Stateful: each stream keeps its own state between calls."
    if model.labels:
        description += f" Labels: {', '.join(model.labels)}."
    return {
        "name": name,
        "title": f"{name} {version}",
        "description": description,
        "inputSchema": {"type": "object", "properties": properties, "required": required, "additionalProperties": False},
        "outputSchema": _output_schema(model, detection),
    }


def _output_schema(model: ModelEntry, detection: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "model": {"type": "string"},
        "model_version": {"type": "string"},
        "outputs": {"type": "object", "description": "raw output tensors by name"},
        "timing_ms": {"type": "object"},
    }
    required = ["model", "model_version"]
    if detection:
        properties["detections"] = _DETECTION_SCHEMA
        required.append("detections")
    else:
        required.append("outputs")
        if model.labels:
            properties["top"] = _TOP_SCHEMA
    if model.stateful:
        properties["stream"] = {
            "type": "object",
            "properties": {"id": {"type": "string"}, "reset": {"type": "boolean"}, "reason": {"type": "string"},
                           "runs": {"type": "integer"}},
        }
    return {"type": "object", "properties": properties, "required": required}

"""A model file as the runtime reads it, and a manifest entry checked against it.

:func:`describe_model` asks the runtime for the tensors (signature names, shapes, dtypes, quantization)
without allocating them, once the model probe (:mod:`agent.models.probe`) has opened the file in a child
process without crashing, and reads the file's own declarations (:mod:`agent.models.tflite_file`: TFLite
Metadata, resource variables). :func:`complete_entry` compares a manifest entry with that description:
a declared tensor count, shape, dtype or quantization that differs refuses the model, naming both; what
the entry leaves out is filled from the file, with the signature's names, so ``models/list`` and MCP
tool schemas describe what is really served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from agent.errors import ModelError
from agent.models.catalog import ModelEntry, Normalization, Quantization, TensorSpec, verified_model_bytes
from agent.models.heads import head_problem
from agent.models.images import image_shape
from agent.models.probe import ModelProbe
from agent.models.taskspec import ClassificationHead, DetectionHead
from agent.models.tflite_file import FileFacts, TensorMetadata, read_file_facts


@dataclass(frozen=True)
class FileTensor:
    """One input or output as the runtime reports it; ``name`` is the signature's name when there is one."""

    name: str
    tensor_name: str
    shape: list[int]
    dtype: str
    quantization: Quantization | None


@dataclass(frozen=True)
class ModelDescription:
    """What a model file holds: its tensors in interpreter order, and its own declarations."""

    inputs: list[FileTensor]
    outputs: list[FileTensor]
    facts: FileFacts


def describe_model(probe: ModelProbe, content: bytes, name: str, sha256: str | None = None) -> ModelDescription:
    """Read a model's tensors with the probe's runtime once the probe has found ``content`` (the file ``name``) safe
    to open; :class:`ModelError` if the probe refuses it or the runtime cannot read it."""
    facts = read_file_facts(content)
    probe.check(content, name, sha256)
    try:
        # Tensors are not allocated: the shapes, types and signatures are in the file.
        interpreter = probe.runtime.interpreter(model_content=content)
        input_details, output_details = interpreter.get_input_details(), interpreter.get_output_details()
        input_names, output_names = _signature_names(interpreter, input_details, output_details)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"the runtime cannot read the model: {exc}") from None
    return ModelDescription(
        [_file_tensor(detail, input_names) for detail in input_details],
        [_file_tensor(detail, output_names) for detail in output_details],
        facts,
    )


def _signature_names(
    interpreter: Any, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]
) -> tuple[dict[int, str], dict[int, str]]:
    """Tensor index -> signature name, from the one signature that covers exactly the model's inputs and outputs."""
    for key in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(key)
        by_input = {int(detail["index"]): name for name, detail in runner.get_input_details().items()}
        by_output = {int(detail["index"]): name for name, detail in runner.get_output_details().items()}
        if set(by_input) == {int(d["index"]) for d in inputs} and set(by_output) == {int(d["index"]) for d in outputs}:
            return by_input, by_output
    return {}, {}


def _file_tensor(detail: dict[str, Any], names: dict[int, str]) -> FileTensor:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    dtype = np.dtype(detail["dtype"])
    quantized = scale != 0.0 and dtype.kind in "iu"
    return FileTensor(
        name=names.get(int(detail["index"]), str(detail["name"])),
        tensor_name=str(detail["name"]),
        shape=[int(dim) for dim in detail["shape"]],
        dtype=dtype.name,
        quantization=Quantization(scale=float(scale), zero_point=int(zero_point)) if quantized else None,
    )


def complete_entry(entry: ModelEntry, description: ModelDescription) -> ModelEntry:
    """``entry`` with what it leaves out filled from the file; :class:`ModelError` naming both on a mismatch."""
    metadata = description.facts.metadata
    # Every mismatch of the entry is gathered before refusing it, so one `models check` shows them all.
    mismatches: list[str] = []
    inputs = _complete_tensors(
        "input", entry.inputs, description.inputs, metadata.inputs if metadata else [], mismatches
    )
    outputs = _complete_tensors(
        "output", entry.outputs, description.outputs, metadata.outputs if metadata else [], mismatches
    )
    if mismatches:
        raise ModelError(f"model {entry.id!r}: " + "; ".join(mismatches) + "; refused")
    labels = entry.labels or next((tensor.labels for tensor in (metadata.outputs if metadata else []) if tensor.labels), [])
    model_description = entry.description or (metadata.description if metadata else "")
    stateful = entry.stateful if entry.stateful is not None else description.facts.has_resource_variables
    completed = entry.model_copy(update={
        "inputs": inputs, "outputs": outputs, "labels": labels, "description": model_description, "stateful": stateful,
    })
    problem = task_problem(completed)
    if problem is not None:
        raise ModelError(f"model {entry.id!r}: {problem}; refused")
    return completed


def task_problem(entry: ModelEntry) -> str | None:
    """Why a completed entry's ``preprocess`` or ``head`` does not fit its tensors, or None."""
    for spec in entry.inputs:
        if spec.preprocess is not None:
            try:
                image_shape(spec.name, spec.shape or [], spec.preprocess)
            except ValueError as exc:
                return str(exc)
    if isinstance(entry.head, ClassificationHead) and not entry.labels:
        return "a classification head needs labels"
    if isinstance(entry.head, DetectionHead):
        return head_problem(entry.head, [spec.shape or [] for spec in entry.outputs])
    return None


def _complete_tensors(
    kind: str,
    declared: list[TensorSpec],
    actual: list[FileTensor],
    metadata: list[TensorMetadata],
    mismatches: list[str],
) -> list[TensorSpec]:
    """The file's tensors completed with what ``declared`` says; each difference appended to ``mismatches``."""
    if declared and len(declared) != len(actual):
        mismatches.append(
            f"the manifest declares {len(declared)} {kind}s ({', '.join(s.name for s in declared)}), "
            f"the file has {len(actual)} ({', '.join(_show(t) for t in actual)})"
        )
        declared = []  # nothing to compare tensor by tensor: the completion is refused anyway
    completed = []
    for position, tensor in enumerate(actual):
        spec = declared[position] if declared else None
        meta = metadata[position] if position < len(metadata) else TensorMetadata()
        if spec is not None:
            problem = _difference(kind, position, spec, tensor)
            if problem is not None:
                mismatches.append(problem)
        normalization = Normalization(mean=meta.mean, std=meta.std) if meta.mean and meta.std else None
        try:
            completed.append(TensorSpec(
                name=spec.name if spec else tensor.name,
                description=(spec.description if spec else "") or meta.description,
                shape=tensor.shape,
                dtype=tensor.dtype,  # type: ignore[arg-type]  # validated here: a dtype the wire cannot carry refuses
                quantization=tensor.quantization,
                normalization=spec.normalization if spec and spec.normalization else normalization,
                preprocess=spec.preprocess if spec else None,
            ))
        except ValidationError:
            mismatches.append(f"{kind} {_show(tensor)} has a dtype the agent cannot serve")
    return completed


def _difference(kind: str, position: int, spec: TensorSpec, tensor: FileTensor) -> str | None:
    """How a declared tensor differs from the file's, naming both, or None."""
    problems = []
    if spec.shape is not None and spec.shape != tensor.shape:
        problems.append(f"shape {spec.shape}, the file has {tensor.shape}")
    if spec.dtype is not None and spec.dtype != tensor.dtype:
        problems.append(f"dtype {spec.dtype}, the file has {tensor.dtype}")
    if spec.quantization is not None and spec.quantization != tensor.quantization:
        actual = tensor.quantization.model_dump() if tensor.quantization else "none"
        problems.append(f"quantization {spec.quantization.model_dump()}, the file has {actual}")
    if not problems:
        return None
    return f"{kind} {position} {spec.name!r} (tensor {tensor.tensor_name}): the manifest says " + "; ".join(problems)


def _show(tensor: FileTensor) -> str:
    return f"{tensor.name} {tensor.shape} {tensor.dtype}"


def complete_from_file(models_dir: Path, probe: ModelProbe, entry: ModelEntry) -> ModelEntry:
    """Read an entry's verified file and complete the entry from it (:func:`complete_entry`)."""
    content = verified_model_bytes(models_dir, entry)
    probe.check(content, entry.file, entry.sha256)  # its refusal names the file and says it is not loaded
    try:
        description = describe_model(probe, content, entry.file, entry.sha256)
    except ModelError as exc:
        raise ModelError(f"model {entry.id!r}: {exc}; refused") from None
    return complete_entry(entry, description)

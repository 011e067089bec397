"""docs/models.md documents the manifest completely: every field of every manifest model, which are required,
and examples that are valid entries, one per kind of model (issue #16). Fails when a field is added to the
manifest without its row, or an example stops validating."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent.models.catalog import (
    DelegateSpec,
    EnsembleEntry,
    EnsembleMember,
    ModelEntry,
    ModelExample,
    Normalization,
    Quantization,
    TensorSpec,
)
from agent.models.taskspec import AnchorConfig, DetectionHead, Preprocess, StreamSettings

DOC = (Path(__file__).parent.parent / "docs" / "models.md").read_text(encoding="utf-8")


def _table(heading: str) -> dict[str, str]:
    """Field name -> second column of the first table after ``heading`` (a first column may name several)."""
    lines = DOC[DOC.index(f"\n{heading}\n"):].splitlines()[1:]
    start = next(index for index, line in enumerate(lines) if line.startswith("|"))
    rows: dict[str, str] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for name in re.findall(r"`([a-z_0-9]+)`", cells[0]):
            rows[name] = cells[1]
    return rows


def _row(heading: str, field: str) -> str:
    line = next(line for line in DOC[DOC.index(f"\n{heading}\n"):].splitlines() if line.startswith(f"| `{field}`"))
    return line


@pytest.mark.parametrize(
    ("heading", "model"),
    [("### ModelEntry", ModelEntry), ("### TensorSpec", TensorSpec), ("### EnsembleEntry", EnsembleEntry)],
)
def test_every_field_has_a_row_saying_whether_it_is_required(heading: str, model: type[BaseModel]) -> None:
    rows = _table(heading)
    assert set(rows) == set(model.model_fields)
    assert {name: rows[name] == "yes" for name in rows} == {
        name: field.is_required() for name, field in model.model_fields.items()
    }


@pytest.mark.parametrize(
    ("heading", "model", "left_out"),
    [("### Preprocess", Preprocess, set()), ("## Task heads", DetectionHead, {"type"})],
)
def test_every_preprocess_and_head_field_has_a_row(heading: str, model: type[BaseModel], left_out: set[str]) -> None:
    rows = _table(heading)
    assert set(rows) == set(model.model_fields) - left_out
    assert {name for name, default in rows.items() if default == "required"} == {
        name for name, field in model.model_fields.items() if field.is_required()
    } - left_out


@pytest.mark.parametrize(
    ("heading", "field", "model"),
    [
        ("### ModelEntry", "examples", ModelExample),
        ("### ModelEntry", "delegate", DelegateSpec),
        ("### ModelEntry", "streams", StreamSettings),
        ("### TensorSpec", "quantization", Quantization),
        ("### TensorSpec", "normalization", Normalization),
        ("### EnsembleEntry", "members", EnsembleMember),
        ("## Task heads", "anchors", AnchorConfig),
    ],
)
def test_nested_fields_are_named_in_their_row(heading: str, field: str, model: type[BaseModel]) -> None:
    row = _row(heading, field)
    assert [name for name in model.model_fields if not re.search(rf"\b{name}\b", row)] == []


def _json_examples() -> list[dict[str, object]]:
    """Every ```json block of the page that is a whole JSON object (fragments and requests included)."""
    examples = []
    for block in re.findall(r"```json\n(.*?)```", DOC, flags=re.S):
        try:
            examples.append(json.loads(block))
        except json.JSONDecodeError:
            continue
    return examples


def test_examples_are_valid_entries_one_per_kind_of_model() -> None:
    kinds = set()
    for example in _json_examples():
        if "strategy" in example:
            EnsembleEntry.model_validate(example)
            kinds.add("ensemble")
        elif "file" in example:
            # Placeholders stand for the file's digest.
            sha256 = str(example["sha256"])
            entry = ModelEntry.model_validate({**example, "sha256": sha256 if len(sha256) == 64 else "0" * 64})
            if isinstance(entry.head, DetectionHead):
                kinds.add(f"detection {entry.head.format}")
            elif entry.labels:
                kinds.add("classification " + ("int8" if entry.inputs and entry.inputs[0].dtype == "int8" else "float"))
            elif entry.inputs:
                kinds.add("raw tensors")
            else:
                kinds.add("minimal (filled from the file)")
    assert kinds == {
        "classification float", "classification int8", "raw tensors", "minimal (filled from the file)",
        "detection ssd_anchors", "detection tflite_postprocess", "ensemble",
    }

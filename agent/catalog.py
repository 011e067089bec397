"""The model catalogue: ``manifest.json`` in ``models_dir``, parsed into pydantic entries.

The manifest is the contract between whoever ships models and the agent: which file, which sha256, what
the inputs and outputs mean. A file whose sha256 does not match is never handed to an interpreter
(tflite-runtime can segfault on a corrupt file), so verification lives here, before inference.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import ModelError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
TensorDType = Literal["float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"]


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    shape: list[int] | None = None
    dtype: TensorDType | None = None


class ModelExample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str
    inputs: dict[str, object]
    expect: str | None = None


class ModelEntry(BaseModel):
    """One model of the manifest."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str
    task: str
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    description: str = ""
    labels: list[str] = Field(default_factory=list)
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    examples: list[ModelExample] = Field(default_factory=list)
    pinned: bool = False
    priority: int = 0
    accuracy: float | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(models_dir: Path) -> Manifest:
    """Parse ``models_dir/manifest.json``; a missing or invalid manifest is a :class:`ModelError`."""
    path = models_dir / MANIFEST_NAME
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ModelError(f"{path}: no model manifest") from None
    except (OSError, ValueError, ValidationError) as exc:
        raise ModelError(f"{path}: invalid manifest: {exc}") from None
    seen: set[str] = set()
    for entry in manifest.models:
        if entry.id in seen:
            raise ModelError(f"{path}: model id {entry.id!r} appears twice")
        seen.add(entry.id)
    return manifest


def verified_model_bytes(models_dir: Path, entry: ModelEntry) -> bytes:
    """Read a model file and check it against the manifest's sha256 before anything parses it."""
    path = models_dir / entry.file
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"model {entry.id!r}: cannot read {path}: {exc.strerror}") from None
    actual = hashlib.sha256(content).hexdigest()
    if actual != entry.sha256:
        raise ModelError(
            f"model {entry.id!r}: {path.name} has sha256 {actual[:16]}..., manifest says {entry.sha256[:16]}...; refused"
        )
    return content

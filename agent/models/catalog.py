"""The model catalogue: ``manifest.json`` in ``models_dir``, parsed into pydantic entries.

The manifest is the contract between whoever ships models and the agent: which file, which sha256, what
the inputs and outputs mean, and which ensembles combine which models. A file whose sha256 does not match
is never handed to an interpreter (tflite-runtime can segfault on a corrupt file), so verification lives
here, before inference.

A :class:`Catalog` is one verified view of the manifest. When the manifest changes on disk a new catalog
is built from the old one (:func:`build_catalog`): only entries or files that changed are hashed again, and
a new version whose file fails verification is refused while the previous version stays in the catalog.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

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


class EnsembleMember(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    weight: float = Field(1.0, gt=0)


class EnsembleEntry(BaseModel):
    """Several models of one task served as one: ``fastest`` runs the member with the lowest measured
    latency, ``weighted_vote`` averages the members' label probabilities with their weights."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str = "1"
    task: str
    strategy: Literal["fastest", "weighted_vote"]
    members: list[EnsembleMember] = Field(min_length=1)
    description: str = ""
    priority: int = 0
    accuracy: float | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry]
    ensembles: list[EnsembleEntry] = Field(default_factory=list)


class FileStamp(NamedTuple):
    """What a file looked like when it was verified; any change means hashing it again."""

    inode: int
    size: int
    mtime_ns: int


def file_stamp(path: Path) -> FileStamp | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return FileStamp(info.st_ino, info.st_size, info.st_mtime_ns)


@dataclass(frozen=True)
class Catalog:
    """One consistent view of what this device serves; replaced whole, never edited, when the manifest changes."""

    models: dict[str, ModelEntry]
    ensembles: dict[str, EnsembleEntry]
    stamps: dict[str, FileStamp | None]
    refused: dict[str, str]

    @property
    def servable_ids(self) -> list[str]:
        """Models whose file verified, then the ensembles whose members all did."""
        models = [model_id for model_id in self.models if model_id not in self.refused]
        ensembles = [
            ensemble.id
            for ensemble in self.ensembles.values()
            if all(member.model not in self.refused for member in ensemble.members)
        ]
        return models + ensembles


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
    except (OSError, ValueError, RecursionError, ValidationError) as exc:  # RecursionError: deep nesting
        raise ModelError(f"{path}: invalid manifest: {exc}") from None
    seen: set[str] = set()
    for entry_id in [entry.id for entry in manifest.models] + [ensemble.id for ensemble in manifest.ensembles]:
        if entry_id in seen:
            raise ModelError(f"{path}: id {entry_id!r} appears twice")
        seen.add(entry_id)
    models = {entry.id: entry for entry in manifest.models}
    for ensemble in manifest.ensembles:
        problem = _ensemble_problem(ensemble, models)
        if problem:
            raise ModelError(f"{path}: ensemble {ensemble.id!r}: {problem}")
    return manifest


def _ensemble_problem(ensemble: EnsembleEntry, models: dict[str, ModelEntry]) -> str | None:
    names = [member.model for member in ensemble.members]
    if len(set(names)) != len(names):
        return "a model is named twice among the members"
    unknown = [name for name in names if name not in models]
    if unknown:
        return f"members {unknown} are not models of this manifest"
    other_tasks = sorted({models[name].task for name in names} - {ensemble.task})
    if other_tasks:
        return f"every member must have task {ensemble.task!r}, not {other_tasks}"
    if ensemble.strategy == "weighted_vote":
        label_sets = {tuple(models[name].labels) for name in names}
        if len(label_sets) != 1 or not next(iter(label_sets)):
            return "weighted_vote needs members with the same non-empty labels, in the same order"
    return None


def verify_model_file(models_dir: Path, entry: ModelEntry) -> FileStamp | None:
    """Hash a model file without holding it in memory; returns its stamp, raises :class:`ModelError` on mismatch."""
    path = models_dir / entry.file
    stamp = file_stamp(path)
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise ModelError(f"model {entry.id!r}: cannot read {path}: {exc.strerror}") from None
    if actual != entry.sha256:
        raise ModelError(
            f"model {entry.id!r}: {path.name} has sha256 {actual[:16]}..., manifest says {entry.sha256[:16]}...; refused"
        )
    return stamp


def build_catalog(models_dir: Path, manifest: Manifest, previous: Catalog | None = None) -> Catalog:
    """Verify a manifest's models into a catalog, reusing what ``previous`` already verified.

    A model whose entry and file are unchanged is not hashed again. A changed model whose file fails
    verification is refused; if ``previous`` served a version of it, that version stays in the catalog.
    """
    models: dict[str, ModelEntry] = {}
    stamps: dict[str, FileStamp | None] = {}
    refused: dict[str, str] = {}
    for entry in manifest.models:
        old = previous.models.get(entry.id) if previous else None
        stamp = file_stamp(models_dir / entry.file)
        if previous is not None and old == entry and stamp is not None and previous.stamps.get(entry.id) == stamp:
            models[entry.id], stamps[entry.id] = old, stamp
            if entry.id in previous.refused:
                refused[entry.id] = previous.refused[entry.id]
            continue
        try:
            stamps[entry.id] = verify_model_file(models_dir, entry)
        except ModelError as exc:
            if previous is not None and old is not None and entry.id not in previous.refused:
                log.error("%s; still serving version %s", exc, old.version)
                models[entry.id], stamps[entry.id] = old, previous.stamps.get(entry.id)
                continue
            log.error("model refused: %s", exc)
            refused[entry.id] = str(exc)
            stamps[entry.id] = stamp
        models[entry.id] = entry
        if old is not None and old != entry:
            log.info("model %s: version %s replaced by %s", entry.id, old.version, entry.version)
    ensembles = {ensemble.id: ensemble for ensemble in manifest.ensembles}
    return Catalog(models, ensembles, stamps, refused)


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

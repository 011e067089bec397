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
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.config import BUNDLED_MODELS_DIR, AcceleratorChoice
from agent.errors import ModelError
from agent.models.taskspec import Head, Preprocess, StreamSettings

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
TensorDType = Literal["float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"]


class Quantization(BaseModel):
    """A quantized tensor's per-tensor parameters: ``real = (q - zero_point) * scale``."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(gt=0)
    zero_point: int


class Normalization(BaseModel):
    """What a client does to raw values before sending them (TFLite Metadata): ``(x - mean) / std``, per channel."""

    model_config = ConfigDict(extra="forbid")

    mean: list[float]
    std: list[float]


class TensorSpec(BaseModel):
    """One input or output, in the interpreter's tensor order; what is left out is filled from the model file."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    shape: list[int] | None = None
    dtype: TensorDType | None = None
    quantization: Quantization | None = None
    normalization: Normalization | None = None
    preprocess: Preprocess | None = None


class ModelExample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str
    inputs: dict[str, object]
    expect: str | None = None


class DelegateSpec(BaseModel):
    """An external TFLite delegate (``load_delegate``): a Coral Edge TPU's ``libedgetpu.so.1``, a vendor's."""

    model_config = ConfigDict(extra="forbid")

    library: str = Field(min_length=1, description="a file path, or a library name the dynamic linker finds")
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="passed to the delegate as strings, e.g. {device = \"usb:0\"}"
    )


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
    # None: [inference] accelerator (the profile's default); "gpu" and a delegate exclude each other.
    accelerator: AcceleratorChoice | None = None
    delegate: DelegateSpec | None = None
    head: Head | None = None
    # None: stateful when the file holds resource variables (filled in when the entry is completed).
    stateful: bool | None = None
    streams: StreamSettings = Field(default_factory=StreamSettings)

    @model_validator(mode="after")
    def _one_accelerator(self) -> ModelEntry:
        if self.delegate is not None and self.accelerator == "gpu":
            raise ValueError("a model runs on accelerator = \"gpu\" or on a delegate, not both")
        if sum(spec.preprocess is not None for spec in self.inputs) > 1:
            raise ValueError("at most one input takes an image (has preprocess)")
        return self


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
    return FileStamp(*_stamp_fields(info))


def _stamp_fields(info: os.stat_result) -> tuple[int, int, int]:
    return info.st_ino, info.st_size, info.st_mtime_ns


@dataclass(frozen=True)
class Catalog:
    """One consistent view of what this device serves; replaced whole, never edited, when the manifest changes."""

    models: dict[str, ModelEntry]
    ensembles: dict[str, EnsembleEntry]
    stamps: dict[str, FileStamp | None]
    refused: dict[str, str]
    # The entries as the manifest wrote them, where ``models`` holds them completed from their files: a later
    # manifest is compared with these, so an entry that leaves fields out is not mistaken for a changed one.
    declared: dict[str, ModelEntry] = field(default_factory=dict)

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

    @property
    def pinned_ids(self) -> list[str]:
        """Models the manifest asks to keep loaded."""
        return [entry.id for entry in self.models.values() if entry.pinned]

    def file_size(self, models_dir: Path, entry: ModelEntry) -> int | None:
        """The size of ``entry``'s file as last verified, else on disk now; None if it cannot be read."""
        verified = self.models.get(entry.id)
        # Another version of the model (one being warmed beside it) has its own file.
        stamp = self.stamps.get(entry.id) if verified is not None and verified.sha256 == entry.sha256 else None
        if stamp is not None:
            return stamp.size
        try:
            return (models_dir / entry.file).stat().st_size
        except OSError:
            return None


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


def overlay_manifest(defaults_dir: Path, models_dir: Path) -> Manifest:
    """The bundled defaults overlaid by ``models_dir``'s manifest: an entry there replaces the default of its id.

    Default entries name their files by absolute path, so ``models_dir / entry.file`` finds either kind. A
    ``models_dir`` without a manifest yet (a fresh device) adds nothing. Ensembles combine models of their
    own manifest only.
    """
    defaults = load_manifest(defaults_dir)
    user = load_manifest(models_dir) if (models_dir / MANIFEST_NAME).exists() else Manifest(models=[])
    user_ids = {entry.id for entry in user.models} | {ensemble.id for ensemble in user.ensembles}
    return Manifest(
        models=[entry.model_copy(update={"file": str(defaults_dir / entry.file)})
                for entry in defaults.models if entry.id not in user_ids] + user.models,
        ensembles=[ensemble for ensemble in defaults.ensembles if ensemble.id not in user_ids] + user.ensembles,
    )


def read_manifest(models_dir: Path, defaults_dir: Path | None) -> Manifest:
    """``models_dir``'s manifest, overlaid on the bundled one in ``defaults_dir`` if set."""
    return load_manifest(models_dir) if defaults_dir is None else overlay_manifest(defaults_dir, models_dir)


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


def open_model_file(models_dir: Path, entry: ModelEntry) -> BinaryIO:
    """Open an entry's file for reading: a regular file named inside ``models_dir``, else :class:`ModelError`.

    The name must stay inside the folder (no ``..``, and no absolute path except into the package's own
    bundled models, which is how :func:`overlay_manifest` names them), so a manifest cannot have the agent
    read any other file. A symlink is followed (operators link model files from a shared store), but what it
    opens must be a regular file: a FIFO would block the reader forever and ``/dev/zero`` never ends. The
    check is made on the opened descriptor (non-blocking, so opening a FIFO returns at once), so swapping
    the file between a check and the read changes nothing.
    """
    return open_model_path(models_dir, entry.file, entry.id)


def open_model_path(models_dir: Path, file: str, model_id: str) -> BinaryIO:
    """:func:`open_model_file` for a manifest entry's ``file`` and ``id`` not yet read into a :class:`ModelEntry`."""
    name = PurePosixPath(file)
    if ".." in name.parts or (name.is_absolute() and not _is_bundled(name)):
        raise ModelError(f"model {model_id!r}: file {file!r} is not inside the models folder; refused")
    path = models_dir / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ModelError(f"model {model_id!r}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelError(f"model {model_id!r}: {path} is not a regular file; refused")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _is_bundled(name: PurePosixPath) -> bool:
    """Whether an absolute name lies in the package's own read-only models (how the overlay names them)."""
    return Path(name).is_relative_to(BUNDLED_MODELS_DIR)


def verify_model_file(models_dir: Path, entry: ModelEntry) -> FileStamp | None:
    """Hash a model file without holding it in memory; returns its stamp, raises :class:`ModelError` on mismatch."""
    path = models_dir / entry.file
    digest = hashlib.sha256()
    with open_model_file(models_dir, entry) as handle:
        stamp = FileStamp(*_stamp_fields(os.fstat(handle.fileno())))
        try:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        except OSError as exc:
            raise ModelError(f"model {entry.id!r}: cannot read {path}: {exc.strerror}") from None
    actual = digest.hexdigest()
    if actual != entry.sha256:
        raise ModelError(
            f"model {entry.id!r}: {path.name} has sha256 {actual[:16]}..., manifest says {entry.sha256[:16]}...; refused"
        )
    return stamp


def build_catalog(
    models_dir: Path,
    manifest: Manifest,
    previous: Catalog | None = None,
    complete: Callable[[ModelEntry], ModelEntry] | None = None,
) -> Catalog:
    """Verify a manifest's models into a catalog, reusing what ``previous`` already verified.

    A model whose entry and file are unchanged is not hashed again. A changed model whose file fails
    verification, or that ``complete`` (checking the entry against the file and filling what it leaves
    out) refuses, is refused; if ``previous`` served a version of it, that version stays in the catalog.
    """
    models: dict[str, ModelEntry] = {}
    declared: dict[str, ModelEntry] = {}
    stamps: dict[str, FileStamp | None] = {}
    refused: dict[str, str] = {}
    for entry in manifest.models:
        old = previous.models.get(entry.id) if previous else None
        old_declared = previous.declared.get(entry.id, old) if previous else None
        stamp = file_stamp(models_dir / entry.file)
        unchanged = old is not None and old_declared == entry and stamp is not None
        if previous is not None and unchanged and previous.stamps.get(entry.id) == stamp:
            models[entry.id], declared[entry.id], stamps[entry.id] = old, entry, stamp
            if entry.id in previous.refused:
                refused[entry.id] = previous.refused[entry.id]
            continue
        completed = entry
        try:
            stamps[entry.id] = verify_model_file(models_dir, entry)
            if complete is not None:
                completed = complete(entry)
        except ModelError as exc:
            if previous is not None and old is not None and entry.id not in previous.refused:
                log.error("%s; still serving version %s", exc, old.version)
                models[entry.id], stamps[entry.id] = old, previous.stamps.get(entry.id)
                declared[entry.id] = old_declared or old
                continue
            log.error("model refused: %s", exc)
            refused[entry.id] = str(exc)
            stamps[entry.id] = stamp
        models[entry.id], declared[entry.id] = completed, entry
        if old_declared is not None and old_declared != entry:
            log.info("model %s: version %s replaced by %s", entry.id, old.version, entry.version)
    ensembles = {ensemble.id: ensemble for ensemble in manifest.ensembles}
    return Catalog(models, ensembles, stamps, refused, declared)


def verified_model_bytes(models_dir: Path, entry: ModelEntry) -> bytes:
    """Read a model file and check it against the manifest's sha256 before anything parses it."""
    path = models_dir / entry.file
    try:
        with open_model_file(models_dir, entry) as handle:
            content = handle.read()
    except OSError as exc:
        raise ModelError(f"model {entry.id!r}: cannot read {path}: {exc.strerror}") from None
    actual = hashlib.sha256(content).hexdigest()
    if actual != entry.sha256:
        raise ModelError(
            f"model {entry.id!r}: {path.name} has sha256 {actual[:16]}..., manifest says {entry.sha256[:16]}...; refused"
        )
    return content

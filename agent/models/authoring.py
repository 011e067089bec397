"""Adding a model to a device: its manifest entry read from the file, written where a running agent finds it.

``edge-agent models add`` uses :func:`add_model_file`: the file is read with the runtime (signature names,
shapes, dtypes, quantization) and its TFLite Metadata (labels, normalization, descriptions), copied into the
writable models folder and its entry written into that folder's manifest. Both writes are atomic (a
temporary file renamed over the old), the file first, so a running agent's hot update (:mod:`agent.models.watcher`)
never sees a manifest naming a file that is not complete. A deployment's activation (:mod:`agent.deploy.activation`)
writes its files and manifest entries with the same functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.errors import ModelError
from agent.models.catalog import MANIFEST_NAME, Manifest, ModelEntry, load_manifest
from agent.models.modelfile import complete_entry, describe_model
from agent.models.probe import ModelProbe


def entry_for_file(
    content: bytes, file: str, *, model_id: str, version: str, task: str, labels: list[str], probe: ModelProbe
) -> ModelEntry:
    """The complete manifest entry for a model file's ``content``; ``labels`` (if any) replace the metadata's."""
    try:
        minimal = ModelEntry(
            id=model_id, version=version, task=task, file=file, sha256=hashlib.sha256(content).hexdigest(), labels=labels
        )
    except ValidationError as exc:
        raise ModelError(f"invalid entry: {exc}") from None
    try:
        description = describe_model(probe, content, file, minimal.sha256)
    except ModelError as exc:
        raise ModelError(f"{file}: {exc}") from None
    return complete_entry(minimal, description)


def add_model_file(
    models_dir: Path,
    source: Path,
    *,
    model_id: str,
    version: str,
    task: str,
    labels: list[str],
    probe: ModelProbe,
) -> ModelEntry:
    """Copy ``source`` into ``models_dir`` as ``<id>-<version>.tflite`` and add (or replace) its manifest entry.

    A new version gets a new file name, so the version being served stays intact until the manifest names
    the new one. A file that crashes the runtime in ``probe`` is a :class:`ModelError` naming ``source``, and
    nothing is written. Returns the entry written.
    """
    try:
        content = source.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {source}: {exc.strerror}") from None
    probe.check(content, str(source))
    file = f"{model_id}-{version}{source.suffix or '.tflite'}"
    entry = entry_for_file(content, file, model_id=model_id, version=version, task=task, labels=labels, probe=probe)
    models_dir.mkdir(parents=True, exist_ok=True)
    new_manifest = manifest_with_entry(models_dir, model_id, entry)
    write_atomically(models_dir / file, content)
    write_manifest(models_dir, new_manifest)
    return entry


def manifest_with_entry(models_dir: Path, model_id: str, entry: ModelEntry | None) -> dict[str, Any]:
    """``models_dir``'s manifest (as written, nothing completed) with ``model_id``'s entry replaced by ``entry``,
    or removed if None; :class:`ModelError` if the manifest there, or the new one, is invalid."""
    if (models_dir / MANIFEST_NAME).exists():
        load_manifest(models_dir)  # an invalid manifest is reported, not overwritten
    raw = read_manifest_json(models_dir)
    kept = [model for model in raw["models"] if model.get("id") != model_id]
    raw["models"] = kept if entry is None else [*kept, entry.model_dump(mode="json", exclude_defaults=True)]
    try:
        Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ModelError(f"the new manifest would be invalid: {exc}") from None
    return raw


def read_manifest_json(models_dir: Path) -> dict[str, Any]:
    """``models_dir``'s manifest as JSON, as written (an empty one if there is none yet)."""
    manifest_path = models_dir / MANIFEST_NAME
    if not manifest_path.exists():
        return {"models": []}
    raw: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
    return raw


def write_manifest(models_dir: Path, raw: dict[str, Any]) -> None:
    """Replace ``models_dir``'s manifest atomically (a running agent's hot update sees the old or the new one)."""
    write_atomically(models_dir / MANIFEST_NAME, (json.dumps(raw, indent=2) + "\n").encode("utf-8"))


def read_labels(path: Path) -> list[str]:
    """A label file: one label per line, blank lines ignored."""
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeError) as exc:
        raise ModelError(f"cannot read labels from {path}: {exc}") from None


def write_atomically(path: Path, content: bytes) -> None:
    """Write ``content`` to a temporary file, fsync it, rename it over ``path`` and fsync the folder."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    # The rename itself survives a power cut only once the folder is synced too.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)

"""Release bundles: built from a model file with the agent's own inspection (``edge-agent models add``), signed
with a release key as the device verifies them (:class:`agent.deploy.documents.BundleManifest`), and kept in a
bundle store the chunk service reads.

Store layout (one folder per bundle, named by its id ``model@version``)::

    <store>/<model>@<version>/manifest.json    the signed manifest (a SignedEnvelope)
    <store>/<model>@<version>/<file>           the bundle's files, byte for byte as the manifest hashes them
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import TypeAdapter, ValidationError

from agent.deploy.documents import MAX_CHUNK_BYTES, SEGMENT, BundleManifest, SignedEnvelope
from agent.deploy.references import REFERENCE_MAX_ELEMENTS
from agent.deploy.staged import ReferenceCase
from agent.deploy.trust import sign_document
from agent.errors import ModelError, ProvisioningError, RequestError
from agent.models.accelerators import Runtime
from agent.models.authoring import entry_for_file, write_atomically
from agent.models.probe import ModelProbe
from agent.models.catalog import ModelEntry
from agent.models.inference import LoadedModel, decode_output, prepare_input
from provisioning.records import load_document

DEFAULT_CHUNK_BYTES = 64 * 1024
BUNDLE_DAYS = 365
MANIFEST_FILE = "manifest.json"
_REFERENCE_INPUTS = TypeAdapter(list[dict[str, Any]])


@dataclass(frozen=True)
class Bundle:
    """A bundle's manifest (signed) and its files' bytes."""

    manifest: BundleManifest
    envelope: SignedEnvelope
    files: dict[str, bytes]


def sign_bundle(
    key: ec.EllipticCurvePrivateKey,
    entry: dict[str, Any],
    files: dict[str, bytes],
    *,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
    issued_at: float | None = None,
    expires: float | None = None,
    **fields: Any,
) -> Bundle:
    """Hash ``files`` into chunks, add ``entry`` (a manifest entry) and sign the manifest with ``key``.

    ``fields`` are further manifest fields (``requirements``, ``references``) or overrides; the result is
    validated as the device validates it.
    """
    now = time.time()
    payload: dict[str, Any] = {
        "type": "bundle", "model_id": entry["id"], "version": entry["version"], "entry": entry,
        "files": [_described(name, data, chunk_size) for name, data in files.items()],
        "issued_at": now if issued_at is None else issued_at,
        "expires": now + BUNDLE_DAYS * 86400.0 if expires is None else expires,
        **fields,
    }  # fmt: skip
    envelope = sign_document(payload, key, "bundle")
    try:
        manifest = BundleManifest.model_validate(envelope.payload)
    except ValidationError as exc:
        raise ProvisioningError(f"the bundle would be refused: {exc}") from None
    return Bundle(manifest, envelope, dict(files))


def bundle_model_file(
    key: ec.EllipticCurvePrivateKey,
    source: Path,
    *,
    model_id: str,
    version: str,
    task: str,
    labels: list[str],
    runtime: Runtime,
    references: list[dict[str, Any]] | None = None,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
    expires: float | None = None,
) -> Bundle:
    """Bundle one model file: its manifest entry read from the file as ``edge-agent models add`` reads it.

    ``references`` are ``{"inputs", "expected"?, "tolerance"?}`` cases; a case without ``expected`` gets the
    outputs this runtime computes for its inputs (run as the device runs them, quantization included).
    """
    try:
        content = source.read_bytes()
    except OSError as exc:
        raise ProvisioningError(f"cannot read {source}: {exc.strerror}") from None
    file = f"{model_id}-{version}{source.suffix or '.tflite'}"
    try:
        # Probed in a child first: a damaged file that crashes the runtime fails the command instead of ending it.
        entry = entry_for_file(content, file, model_id=model_id, version=version, task=task, labels=labels,
                               probe=ModelProbe(runtime))  # fmt: skip
    except ModelError as exc:
        raise ProvisioningError(str(exc)) from None
    cases = [case.model_dump(mode="json") for case in measure_references(entry, content, runtime, references or [])]
    return sign_bundle(key, entry.model_dump(mode="json", exclude_defaults=True), {file: content},
                       chunk_size=chunk_size, expires=expires, references=cases)  # fmt: skip


def read_references(path: Path) -> list[dict[str, Any]]:
    """A JSON list of reference cases: ``inputs``, and optionally ``expected`` and ``tolerance``."""
    try:
        cases = _REFERENCE_INPUTS.validate_json(path.read_bytes())
    except OSError as exc:
        raise ProvisioningError(f"cannot read {path}: {exc.strerror}") from None
    except ValidationError as exc:
        raise ProvisioningError(f"{path}: not a list of reference cases: {exc}") from None
    if any("inputs" not in case for case in cases):
        raise ProvisioningError(f"{path}: every reference case has inputs")
    return cases


def measure_references(
    entry: ModelEntry, content: bytes, runtime: Runtime, cases: list[dict[str, Any]]
) -> list[ReferenceCase]:
    """``cases`` as reference cases, the outputs of those without ``expected`` computed with ``runtime``."""
    if all("expected" in case for case in cases):
        return [_reference(case) for case in cases]
    if entry.stateful:
        raise ProvisioningError(f"{entry.id} is stateful: give each reference case its expected outputs")
    try:
        loaded = LoadedModel(entry, content, runtime=runtime)
    except (ModelError, RequestError) as exc:
        raise ProvisioningError(f"cannot run {entry.id} to measure its reference outputs: {exc}") from None
    measured = []
    try:
        for case in cases:
            if "expected" not in case:
                try:
                    feeds = {info.name: prepare_input(info, case["inputs"][info.name], raw=False,
                                                      max_elements=REFERENCE_MAX_ELEMENTS) for info in loaded.inputs}  # fmt: skip
                except KeyError as exc:
                    raise ProvisioningError(f"a reference case lacks the input {exc}") from None
                except RequestError as exc:
                    raise ProvisioningError(f"a reference case's input {exc.name}: {exc.message}") from None
                outputs = loaded.run(feeds)
                case = {**case, "expected": {info.name: decode_output(info, outputs[info.name], raw=False).tolist()
                                             for info in loaded.outputs}}  # fmt: skip
            measured.append(_reference(case))
    finally:
        loaded.close()
    return measured


def _reference(case: dict[str, Any]) -> ReferenceCase:
    try:
        return ReferenceCase.model_validate(case)
    except ValidationError as exc:
        raise ProvisioningError(f"not a reference case: {exc}") from None


def _described(name: str, data: bytes, chunk_size: int) -> dict[str, Any]:
    if not 1 <= chunk_size <= MAX_CHUNK_BYTES:
        raise ProvisioningError(f"chunks are 1 to {MAX_CHUNK_BYTES} bytes, not {chunk_size}")
    chunks = [hashlib.sha256(data[i : i + chunk_size]).hexdigest() for i in range(0, len(data), chunk_size)]
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "chunk_size": chunk_size,
            "chunks": chunks}  # fmt: skip


class BundleStore:
    """Bundles on disk, written once and read by any number of chunk service instances."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, bundle: Bundle) -> Path:
        """Store ``bundle`` (files first, the manifest last: a half-written bundle has no manifest)."""
        directory = self.root / bundle.manifest.bundle_id
        if (directory / MANIFEST_FILE).exists():
            if self.envelope(bundle.manifest.bundle_id).payload != bundle.envelope.payload:
                raise ProvisioningError(f"{directory} holds another bundle {bundle.manifest.bundle_id}: "
                                        "a released version is never replaced; bump the version")  # fmt: skip
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in bundle.files.items():
            write_atomically(directory / name, data)
        write_atomically(directory / MANIFEST_FILE, bundle.envelope.model_dump_json().encode())
        return directory

    def envelope(self, bundle_id: str) -> SignedEnvelope:
        """The signed manifest of ``bundle_id`` (``model@version``), or :class:`ProvisioningError`."""
        path = self._directory(bundle_id) / MANIFEST_FILE
        if not path.is_file():
            raise ProvisioningError(f"no bundle {bundle_id} in {self.root}")
        return load_document(SignedEnvelope, path)

    def manifest(self, bundle_id: str) -> BundleManifest:
        return BundleManifest.model_validate(self.envelope(bundle_id).payload)

    def bundle_ids(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(path.parent.name for path in self.root.glob(f"*/{MANIFEST_FILE}"))

    def read_chunk(self, bundle_id: str, file: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of a stored file (no state: the file is opened for each read)."""
        fd = os.open(self._directory(bundle_id) / _segment(file), os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def _directory(self, bundle_id: str) -> Path:
        model_id, _, version = bundle_id.partition("@")
        if not _segment_ok(model_id) or not version or "/" in version or version.startswith("."):
            raise ProvisioningError(f"not a bundle id: {bundle_id!r} (model@version)")
        return self.root / bundle_id


def _segment_ok(value: str) -> bool:
    return re.fullmatch(SEGMENT, value) is not None


def _segment(value: str) -> str:
    if not _segment_ok(value):
        raise ProvisioningError(f"not a bundle file name: {value!r}")
    return value


def describe(bundle: BundleManifest) -> dict[str, Any]:
    """A short JSON description of a bundle for the command line."""
    return {"bundle": bundle.bundle_id, "files": [{"name": f.name, "size": f.size, "chunks": len(f.chunks)}
                                                  for f in bundle.files],
            "references": len(bundle.references), "expires": bundle.expires}  # fmt: skip


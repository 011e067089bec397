"""The device identity: opening the root key for the configured backend, and what ``edge-agent identity`` prints.

For the TPM backend the agent records the key's public-key fingerprint in ``<data_dir>/identity.json`` the
first time, and from then on refuses to start if the handle holds any other key: a swapped key would
otherwise sign as this device without anyone noticing.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.compat import UTC
from agent.config import Signing
from agent.errors import SigningError
from agent.signing.delegation import build_csr
from agent.signing.roots import RootKey, SoftwareRootKey, public_key_fingerprint, public_key_pem

logger = logging.getLogger(__name__)

RECORD_FILE = "identity.json"
DEFAULT_KEY_FILE = "device-key.pem"


class IdentityRecord(BaseModel):
    """What the agent remembers about its TPM key, to recognise it at every start."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["tpm"] = "tpm"
    handle: str
    public_key_sha256: str
    public_key_pem: str
    recorded_at: datetime


class IdentityInfo(BaseModel):
    """The device identity as ``edge-agent identity init|show`` reports it."""

    backend: Literal["tpm", "software"]
    device_id: str
    location: str
    public_key_pem: str
    public_key_sha256: str
    csr_pem: str
    created: bool


def key_file_path(settings: Signing, data_dir: Path) -> Path:
    """The software key file: ``signing.key_file``, else ``<data_dir>/device-key.pem``."""
    return settings.key_file or data_dir / DEFAULT_KEY_FILE


def open_root_key(settings: Signing, data_dir: Path, *, create: bool = True, tpm_delay_s: float = 0.0) -> RootKey:
    """Open the configured root key, creating it if ``create`` and none exists yet.

    For ``tpm``: checks the key at the handle against the recorded fingerprint (recording it the first
    time). Raises :class:`SigningError` with the reason the key is unusable.
    """
    if settings.backend == "none":
        raise SigningError('signing.backend is "none": this device has no signing key')
    if settings.backend == "software":
        return SoftwareRootKey.open(key_file_path(settings, data_dir), create=create)
    from agent.signing.tpm import TpmRootKey  # only here: the other backends must work without the TSS libs

    record = load_record(data_dir)
    root = TpmRootKey.open(
        tcti=settings.tcti,
        handle=settings.handle,
        owner_auth=settings.owner_auth,
        timeout_s=settings.tpm_timeout_s,
        delay_s=tpm_delay_s,
        create_if_missing=create and record is None,
    )
    try:
        fingerprint = public_key_fingerprint(root.public_key)
        if record is None:
            if not root.created:
                logger.warning("adopting the signing key already at TPM handle %#x as the device key", settings.handle)
            save_record(data_dir, settings.handle, root)
        elif record.public_key_sha256 != fingerprint:
            raise SigningError(
                f"TPM handle {settings.handle:#x} holds key {fingerprint[:16]}..., but this device's key is "
                f"{record.public_key_sha256[:16]}... ({data_dir / RECORD_FILE}): refusing to sign with another key"
            )
    except BaseException:
        root.close()
        raise
    return root


def load_record(data_dir: Path) -> IdentityRecord | None:
    """The recorded TPM identity, or None if this device has none yet."""
    path = data_dir / RECORD_FILE
    try:
        return IdentityRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        raise SigningError(f"{path} is unreadable or corrupt ({exc}); restore it or remove it to re-enrol") from None


def save_record(data_dir: Path, handle: int, root: RootKey) -> IdentityRecord:
    """Record the root key's fingerprint atomically (write, fsync, rename)."""
    record = IdentityRecord(
        handle=f"{handle:#x}",
        public_key_sha256=public_key_fingerprint(root.public_key),
        public_key_pem=public_key_pem(root.public_key),
        recorded_at=datetime.now(UTC),
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / RECORD_FILE
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w", encoding="utf-8") as handle_file:
        handle_file.write(json.dumps(record.model_dump(mode="json"), indent=2) + "\n")
        handle_file.flush()
        os.fsync(handle_file.fileno())
    os.replace(temporary, path)
    return record


def init_identity(settings: Signing, device_id: str, data_dir: Path) -> IdentityInfo:
    """Create the device key if there is none (or load it), and describe it with a CSR for the fleet CA."""
    return _describe(settings, device_id, data_dir, create=True)


def show_identity(settings: Signing, device_id: str, data_dir: Path) -> IdentityInfo:
    """Describe the existing device key; :class:`SigningError` if there is none yet."""
    return _describe(settings, device_id, data_dir, create=False)


def _describe(settings: Signing, device_id: str, data_dir: Path, *, create: bool) -> IdentityInfo:
    if settings.backend == "none":
        raise SigningError('signing.backend is "none": set it to "tpm" or "software" to have a device identity')
    if settings.backend == "tpm" and not create and load_record(data_dir) is None:
        raise SigningError(f"no device identity recorded in {data_dir}: run `edge-agent identity init` first")
    root = open_root_key(settings, data_dir, create=create)
    try:
        csr = build_csr(root, device_id)
        location = (
            f"TPM {settings.tcti} handle {settings.handle:#x}"
            if settings.backend == "tpm"
            else str(key_file_path(settings, data_dir))
        )
        return IdentityInfo(
            backend=root.backend,
            device_id=device_id,
            location=location,
            public_key_pem=public_key_pem(root.public_key),
            public_key_sha256=public_key_fingerprint(root.public_key),
            csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            created=root.created,
        )
    finally:
        root.close()

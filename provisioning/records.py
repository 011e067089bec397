"""The JSON documents provisioning exchanges and keeps: a device's enrolment record and the fleet inventory.

Both are written only when their content changes, atomically, so re-running a command that has nothing
to do leaves every file (and its modification time) as it was.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from agent.config import DEVICE_ID_PATTERN
from agent.errors import ProvisioningError

Name = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
Status = Literal["active", "revoked"]
CaName = Literal["identity", "broker"]
RevocationReason = Literal["revoked", "superseded"]
CA_NAMES: tuple[CaName, ...] = ("identity", "broker")
# The deployment keys `fleet sign-csr` writes beside a device's certificates (devices/<id>/edge-agent/) and
# provision-device installs into /etc/edge-agent/tls/ and names in [deploy] (provisioning/rollout/release.py).
DEPLOY_ROOT_FILE = "deploy-root.pem"
DEPLOY_RELEASE_PREFIX = "deploy-release-"


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceRecord(Document):
    """What ``provision-device`` emits for the fleet inventory: the device's keys and requests to certify them.

    Only the identity key may live in the TPM; the two TLS keys are files because paho and mosquitto load
    keys from files.
    """

    device_id: Name
    profile: str
    signing_backend: Literal["tpm", "software"]
    public_key_pem: str
    public_key_sha256: str
    identity_csr_pem: str = Field(description="for the identity CA: the device key, CN = device id")
    agent_tls_csr_pem: str = Field(description="the agent's TLS client key on its own broker")
    broker_tls_csr_pem: str = Field(description="the device broker's TLS server key")
    broker_names: list[str] = Field(description="host names and addresses clients reach the device broker by")
    groups: list[Name] = Field(default_factory=list, description="deployment groups ([deploy] groups)")


class IssuedCertificate(Document):
    serial: str = Field(description="hexadecimal, as openssl prints it")
    public_key_sha256: str
    not_after: datetime


class DeviceEntry(Document):
    device_id: Name
    profile: str
    groups: list[Name] = Field(default_factory=list, description="deployment groups, from the device's record")
    status: Status = "active"
    public_key_pem: str
    public_key_sha256: str
    identity: IssuedCertificate
    agent_tls: IssuedCertificate | None = None
    broker_tls: IssuedCertificate | None = None
    revoked_at: datetime | None = None


class ClientEntry(Document):
    name: Name
    status: Status = "active"
    tls: IssuedCertificate
    revoked_at: datetime | None = None


class Revocation(Document):
    serial: str
    ca: CaName
    subject: str
    reason: RevocationReason
    revoked_at: datetime


class Inventory(Document):
    """Every device and client the fleet CA has certified, and every certificate it has revoked."""

    version: Literal[1] = 1
    devices: dict[str, DeviceEntry] = Field(default_factory=dict)
    clients: dict[str, ClientEntry] = Field(default_factory=dict)
    revocations: list[Revocation] = Field(default_factory=list)
    crl_numbers: dict[CaName, int] = Field(default_factory=lambda: dict.fromkeys(CA_NAMES, 0))


DocumentT = TypeVar("DocumentT", bound=BaseModel)


def load_document(model: type[DocumentT], path: Path) -> DocumentT:
    """Read and validate one JSON document, naming the file in any error."""
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ProvisioningError(f"{path}: no such file") from None
    except (OSError, ValidationError) as exc:
        raise ProvisioningError(f"{path}: not a valid {model.__name__}: {exc}") from None


def dump_document(document: Document) -> bytes:
    return (document.model_dump_json(indent=2) + "\n").encode("utf-8")


def write_if_changed(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Atomically make ``path`` hold ``data`` with ``mode``; returns False (touching nothing) if it already did."""
    try:
        if path.read_bytes() == data and path.stat().st_mode & 0o777 == mode:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as handle:
        os.fchmod(handle.fileno(), mode)  # the umask may have narrowed the mode given to open()
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return True

"""A fleet of software-key devices, for the tests and benchmarks of the ingest (real CAs and inventory)."""

from __future__ import annotations

from pathlib import Path

from agent.config import Signing
from agent.signing import init_identity
from provisioning.fleet import Fleet
from provisioning.records import DeviceRecord


def enrol_software_device(fleet: Fleet, device_id: str, key_file: Path) -> None:
    """Create (or reuse) a software device key at ``key_file`` and have ``fleet`` certify it for ``device_id``,
    as ``provision-device`` and ``fleet sign-csr`` would for a TPM key. Creates the fleet's CAs if needed."""
    if not fleet.inventory_path.exists():
        fleet.init_ca("edge-agent test fleet")
    identity = init_identity(Signing(backend="software", key_file=key_file), device_id, key_file.parent)
    csr = identity.csr_pem  # only the identity CSR is certified here; the TLS ones are not used
    fleet.sign_csr(
        DeviceRecord(
            device_id=device_id, profile="x86-generic", signing_backend="software",
            public_key_pem=identity.public_key_pem, public_key_sha256=identity.public_key_sha256,
            identity_csr_pem=csr, agent_tls_csr_pem=csr, broker_tls_csr_pem=csr, broker_names=[],
        )
    )  # fmt: skip

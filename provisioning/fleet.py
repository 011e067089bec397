"""The operator's side of provisioning: the fleet's CAs, device and client certificates, inventory and CRLs.

Run as ``provisioning/fleet [--dir FLEET_DIR] COMMAND`` (or ``python -m provisioning.fleet``). Every
command is idempotent: run again with the same input it writes nothing. A device that provisions again
keeps its id; if its keys changed, its old certificates are revoked as superseded.

Layout of the fleet directory (keep it, or at least ``ca/*-key.pem``, offline and backed up)::

    inventory.json                    devices, clients, revocations
    ca/identity-ca.pem, -key.pem      issues device identity certificates (verifiers of signed answers)
    ca/broker-ca.pem, -key.pem        issues TLS certificates only: the one CA the device brokers trust
    ca/identity-crl.pem, broker-crl.pem
    devices/<id>/edge-agent/          -> /etc/edge-agent/tls/ on the device
    devices/<id>/mosquitto/           -> /etc/mosquitto/edge-agent/ on the device
    clients/<name>/                   a client's certificate, key and the broker CA
"""

from __future__ import annotations

import argparse
import os
import re
import string
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.compat import UTC
from agent.config import DEVICE_ID_PATTERN
from agent.errors import AgentError, ProvisioningError
from provisioning import ca as x509ca
from provisioning.ingest import cli as ingest_cli
from provisioning.rollout import cli as rollout_cli
from provisioning.rollout.release import ReleaseKeys
from provisioning.records import (
    CA_NAMES,
    DEPLOY_RELEASE_PREFIX,
    DEPLOY_ROOT_FILE,
    CaName,
    ClientEntry,
    DeviceEntry,
    DeviceRecord,
    Inventory,
    IssuedCertificate,
    Revocation,
    RevocationReason,
    dump_document,
    load_document,
    write_if_changed,
)

ACL_TEMPLATE = Path(__file__).resolve().parent.parent / "systemd" / "mosquitto-edge-agent.acl"
CA_DAYS = 20 * 365
LEAF_DAYS = 10 * 365
CRL_DAYS = 365
RENEW_BEFORE = timedelta(days=30)
PUBLIC, PRIVATE = 0o644, 0o600


class Fleet:
    """One fleet directory; every method loads the inventory, changes it and saves it only if it changed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.written: list[Path] = []
        self._stale_crls: set[CaName] = set()

    @property
    def inventory_path(self) -> Path:
        return self.root / "inventory.json"

    def ca_certificate_path(self, ca: CaName) -> Path:
        return self.root / "ca" / f"{ca}-ca.pem"

    def crl_path(self, ca: CaName) -> Path:
        return self.root / "ca" / f"{ca}-crl.pem"

    def device_dir(self, device_id: str) -> Path:
        return self.root / "devices" / device_id

    def client_dir(self, name: str) -> Path:
        return self.root / "clients" / name

    def _ca_key_path(self, ca: CaName) -> Path:
        return self.root / "ca" / f"{ca}-ca-key.pem"

    def init_ca(self, organisation: str, days: int = CA_DAYS) -> None:
        """Create both CAs, an empty inventory and empty CRLs, keeping whatever already exists."""
        present = [path.exists() for ca in CA_NAMES for path in (self.ca_certificate_path(ca), self._ca_key_path(ca))]
        if any(present) and not all(present):
            raise ProvisioningError(f"{self.root / 'ca'} holds only part of the CAs: restore it from a backup")
        if not any(present):
            # The identity CA's certificates are CAs themselves (pathlen 0); the broker CA issues only leaves.
            path_lengths: dict[CaName, int] = {"identity": 1, "broker": 0}
            for ca, path_length in path_lengths.items():
                key, certificate = x509ca.create_ca(f"{organisation} {ca} CA", path_length=path_length, days=days)
                self._write(self._ca_key_path(ca), x509ca.private_key_pem(key), PRIVATE)
                self._write(self.ca_certificate_path(ca), x509ca.certificate_pem(certificate))
        inventory = self._load() if self.inventory_path.exists() else Inventory()
        self._stale_crls.update(ca for ca in CA_NAMES if not self.crl_path(ca).exists())
        self._save(inventory)

    def sign_csr(self, record: DeviceRecord, days: int = LEAF_DAYS) -> DeviceEntry:
        """Certify a device's identity key (``CN = device id``) and enter the device in the inventory."""
        inventory = self._load()
        device_id = record.device_id
        if device_id in inventory.clients:
            raise ProvisioningError(f"{device_id!r} is already a client's name; a device id must differ")
        common_name, public_key = x509ca.load_csr(record.identity_csr_pem, f"{device_id}: identity CSR")
        if common_name != device_id:
            raise ProvisioningError(f"{device_id}: the identity CSR names {common_name!r}")
        if x509ca.public_key_sha256(public_key) != record.public_key_sha256:
            raise ProvisioningError(f"{device_id}: the record's public key is not the one in its identity CSR")
        twin = next(
            (other for other in inventory.devices.values() if other.public_key_sha256 == record.public_key_sha256), None
        )
        if twin is not None and twin.device_id != device_id:
            raise ProvisioningError(f"{device_id}: this key is already certified for device {twin.device_id!r}")
        entry = inventory.devices.get(device_id)
        _refuse_revoked(entry, f"device {device_id}")
        identity = self._ensure_certificate(
            inventory,
            "identity",
            entry.identity if entry else None,
            self.device_dir(device_id) / "edge-agent" / "device.pem",
            public_key,
            device_id,
            "device",
            days,
        )
        pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        updated = DeviceEntry(
            device_id=device_id,
            profile=record.profile,
            groups=record.groups,
            public_key_pem=pem.decode("ascii"),
            public_key_sha256=record.public_key_sha256,
            identity=identity,
            agent_tls=entry.agent_tls if entry else None,
            broker_tls=entry.broker_tls if entry else None,
        )
        inventory.devices[device_id] = updated
        self._copy(self.ca_certificate_path("identity"), self.device_dir(device_id) / "edge-agent" / "identity-ca.pem")
        self._copy_release_keys(device_id)
        self._save(inventory)
        return updated

    def issue_broker_creds(
        self, record: DeviceRecord | None = None, clients: Sequence[str] = (), days: int = LEAF_DAYS
    ) -> None:
        """TLS certificates for a device's broker and agent (from ``record``) and for named clients.

        A device gets its broker's server certificate, its agent's client certificate (username = device
        id), the broker CA, the CRL and its broker's ACL. A client gets a key, a certificate and the broker
        CA; the ACL's patterns already cover every client, so clients need no entries of their own.
        """
        inventory = self._load()
        if record is not None:
            self._issue_device_tls(inventory, record, days)
        for name in clients:
            self._issue_client(inventory, name, days)
        self._save(inventory)

    def revoke_device(self, device_id: str) -> None:
        """Revoke every certificate of a device; it stays in the inventory as revoked."""
        inventory = self._load()
        entry = inventory.devices.get(device_id)
        if entry is None:
            raise ProvisioningError(f"no device {device_id!r} in {self.inventory_path}")
        if entry.status == "active":
            entry.status, entry.revoked_at = "revoked", datetime.now(UTC)
            self._revoke(inventory, "identity", entry.identity, device_id, "revoked")
            for issued in (entry.agent_tls, entry.broker_tls):
                if issued is not None:
                    self._revoke(inventory, "broker", issued, device_id, "revoked")
        self._save(inventory)

    def revoke_client(self, name: str) -> None:
        """Revoke a client's certificate; every device broker refuses it once it has the new CRL."""
        inventory = self._load()
        entry = inventory.clients.get(name)
        if entry is None:
            raise ProvisioningError(f"no client {name!r} in {self.inventory_path}")
        if entry.status == "active":
            entry.status, entry.revoked_at = "revoked", datetime.now(UTC)
            self._revoke(inventory, "broker", entry.tls, name, "revoked")
        self._save(inventory)

    def refresh_crls(self, days: int = CRL_DAYS) -> None:
        """Re-issue both CRLs with a new validity period (they must be renewed before it ends)."""
        inventory = self._load()
        self._stale_crls.update(CA_NAMES)
        self._save(inventory, crl_days=days)

    def _issue_device_tls(self, inventory: Inventory, record: DeviceRecord, days: int) -> None:
        device_id = record.device_id
        entry = inventory.devices.get(device_id)
        if entry is None:
            raise ProvisioningError(f"device {device_id} has no identity yet: run `fleet sign-csr` first")
        _refuse_revoked(entry, f"device {device_id}")
        agent_key = x509ca.load_csr(record.agent_tls_csr_pem, f"{device_id}: agent TLS CSR").public_key
        broker_key = x509ca.load_csr(record.broker_tls_csr_pem, f"{device_id}: broker TLS CSR").public_key
        bundle = self.device_dir(device_id)
        entry.agent_tls = self._ensure_certificate(
            inventory,
            "broker",
            entry.agent_tls,
            bundle / "edge-agent" / "agent.pem",
            agent_key,
            device_id,
            "client",
            days,
        )
        names = [device_id, f"{device_id}.local", *record.broker_names, "localhost", "127.0.0.1", "::1"]
        entry.broker_tls = self._ensure_certificate(
            inventory,
            "broker",
            entry.broker_tls,
            bundle / "mosquitto" / "broker.pem",
            broker_key,
            device_id,
            "server",
            days,
            names,
        )
        self._copy(self.ca_certificate_path("broker"), bundle / "edge-agent" / "broker-ca.pem")
        self._copy(self.ca_certificate_path("broker"), bundle / "mosquitto" / "ca.pem")
        self._copy(self.crl_path("broker"), bundle / "mosquitto" / "crl.pem")
        acl = string.Template(ACL_TEMPLATE.read_text()).substitute(device_id=device_id)
        self._write(bundle / "mosquitto" / "acl", acl.encode("utf-8"))

    def _issue_client(self, inventory: Inventory, name: str, days: int) -> None:
        if not re.match(DEVICE_ID_PATTERN, name):
            raise ProvisioningError(f"{name!r} is not a usable client name: 1-64 of A-Z a-z 0-9 . _ -")
        if name in inventory.devices:
            raise ProvisioningError(f"{name!r} is a device id; a client named so would act as that device's agent")
        entry = inventory.clients.get(name)
        _refuse_revoked(entry, f"client {name}")
        directory = self.client_dir(name)
        key_path = directory / "client-key.pem"
        if key_path.exists():
            key = x509ca.load_private_key(key_path)
        else:
            key = x509ca.new_key()
            self._write(key_path, x509ca.private_key_pem(key), PRIVATE)
        issued = self._ensure_certificate(
            inventory,
            "broker",
            entry.tls if entry else None,
            directory / "client.pem",
            key.public_key(),
            name,
            "client",
            days,
        )
        inventory.clients[name] = ClientEntry(name=name, tls=issued)
        self._copy(self.ca_certificate_path("broker"), directory / "ca.pem")

    def _ensure_certificate(
        self,
        inventory: Inventory,
        ca: CaName,
        existing: IssuedCertificate | None,
        path: Path,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        kind: x509ca.LeafKind,
        days: int,
        dns_names: Sequence[str] = (),
    ) -> IssuedCertificate:
        """The existing certificate if it still fits (same key and names, not near expiry), else a new one
        that supersedes it."""
        fingerprint = x509ca.public_key_sha256(public_key)
        if existing is not None and _still_fits(path, existing, fingerprint, dns_names):
            return existing
        ca_key, ca_certificate = self._ca(ca)
        certificate = x509ca.issue_certificate(
            ca_key,
            ca_certificate,
            common_name=common_name,
            public_key=public_key,
            kind=kind,
            days=days,
            dns_names=dns_names,
        )
        if existing is not None:
            self._revoke(inventory, ca, existing, common_name, "superseded")
        self._write(path, x509ca.certificate_pem(certificate))
        return IssuedCertificate(
            serial=f"{certificate.serial_number:x}",
            public_key_sha256=fingerprint,
            not_after=certificate.not_valid_after_utc,
        )

    def _revoke(
        self, inventory: Inventory, ca: CaName, issued: IssuedCertificate, subject: str, reason: RevocationReason
    ) -> None:
        if any(revocation.serial == issued.serial for revocation in inventory.revocations):
            return
        inventory.revocations.append(
            Revocation(serial=issued.serial, ca=ca, subject=subject, reason=reason, revoked_at=datetime.now(UTC))
        )
        self._stale_crls.add(ca)

    def _load(self) -> Inventory:
        if not self.inventory_path.exists():
            raise ProvisioningError(f"no fleet in {self.root}: run `fleet init-ca` first")
        return load_document(Inventory, self.inventory_path)

    def _save(self, inventory: Inventory, crl_days: int = CRL_DAYS) -> None:
        for ca in sorted(self._stale_crls):
            inventory.crl_numbers[ca] += 1
            ca_key, ca_certificate = self._ca(ca)
            revoked = [
                (int(entry.serial, 16), entry.revoked_at, entry.reason == "superseded")
                for entry in inventory.revocations
                if entry.ca == ca
            ]
            crl = x509ca.build_crl(ca_key, ca_certificate, revoked, number=inventory.crl_numbers[ca], days=crl_days)
            self._write(self.crl_path(ca), crl.public_bytes(serialization.Encoding.PEM))
        if "broker" in self._stale_crls:
            # Device brokers need the new CRL; their bundles carry it so the operator can copy them out.
            for device_id, entry in inventory.devices.items():
                if entry.broker_tls is not None and entry.status == "active":
                    self._copy(self.crl_path("broker"), self.device_dir(device_id) / "mosquitto" / "crl.pem")
        self._stale_crls.clear()
        self._write(self.inventory_path, dump_document(inventory))

    def _ca(self, ca: CaName) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        try:
            return x509ca.load_private_key(self._ca_key_path(ca)), x509ca.load_certificate(self.ca_certificate_path(ca))
        except FileNotFoundError as exc:
            raise ProvisioningError(f"the {ca} CA is missing ({exc.filename}): run `fleet init-ca`") from None

    def _copy_release_keys(self, device_id: str) -> None:
        """The deployment root key and the release keys in force, for the device's ``[deploy]`` section."""
        release = ReleaseKeys(self.root)
        if not release.exists():
            return
        target = self.device_dir(device_id) / "edge-agent"
        self._copy(release.root_public_path, target / DEPLOY_ROOT_FILE)
        for index, pem in enumerate(release.trusted_pems()):
            self._write(target / f"{DEPLOY_RELEASE_PREFIX}{index}.pem", pem.encode("ascii"))

    def _copy(self, source: Path, target: Path) -> None:
        self._write(target, source.read_bytes())

    def _write(self, path: Path, data: bytes, mode: int = PUBLIC) -> None:
        if write_if_changed(path, data, mode):
            self.written.append(path)


def _refuse_revoked(entry: DeviceEntry | ClientEntry | None, what: str) -> None:
    if entry is not None and entry.status == "revoked":
        raise ProvisioningError(f"{what} is revoked; a revoked identity stays revoked: enrol it under a new name")


def _still_fits(path: Path, existing: IssuedCertificate, fingerprint: str, dns_names: Sequence[str]) -> bool:
    if existing.public_key_sha256 != fingerprint or existing.not_after - datetime.now(UTC) < RENEW_BEFORE:
        return False
    return x509ca.certificate_matches(path, existing.serial, fingerprint, dns_names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("EDGE_FLEET_DIR", "fleet")),
        help="the fleet directory (default: $EDGE_FLEET_DIR, else ./fleet)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init-ca", help="create the identity and broker CAs and the inventory")
    init.add_argument("--organisation", default="edge-agent fleet", help="prefix of the CA names")
    init.add_argument("--days", type=int, default=CA_DAYS)
    sign = commands.add_parser("sign-csr", help="certify a device's identity key from its provision-device record")
    sign.add_argument("record", type=Path)
    sign.add_argument("--days", type=int, default=LEAF_DAYS)
    creds = commands.add_parser("issue-broker-creds", help="TLS certificates and ACL for a device broker and clients")
    creds.add_argument("--record", type=Path, help="a provision-device record: the device's broker and agent")
    creds.add_argument("--client", action="append", default=[], help="a client name (repeatable)")
    creds.add_argument("--days", type=int, default=LEAF_DAYS)
    revoke = commands.add_parser("revoke", help="revoke a device or a client and re-issue the CRLs")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--device")
    which.add_argument("--client")
    crl = commands.add_parser("crl", help="re-issue both CRLs (do so before they expire)")
    crl.add_argument("--days", type=int, default=CRL_DAYS)
    commands.add_parser("show", help="print the inventory")
    ingest_cli.add_commands(commands)
    rollout_cli.add_commands(commands)
    return parser


def run(args: argparse.Namespace) -> Fleet:
    """Carry out one parsed command; the returned fleet lists the files it wrote."""
    fleet = Fleet(args.dir)
    if args.command == "init-ca":
        fleet.init_ca(args.organisation, args.days)
    elif args.command == "sign-csr":
        fleet.sign_csr(load_document(DeviceRecord, args.record), args.days)
    elif args.command == "issue-broker-creds":
        if args.record is None and not args.client:
            raise ProvisioningError("give --record for a device, --client NAME for clients, or both")
        record = load_document(DeviceRecord, args.record) if args.record else None
        fleet.issue_broker_creds(record, args.client, args.days)
    elif args.command == "revoke":
        if args.device:
            fleet.revoke_device(args.device)
        else:
            fleet.revoke_client(args.client)
    elif args.command == "crl":
        fleet.refresh_crls(args.days)
    return fleet


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "handler"):
        return ingest_cli.run_command(args)
    try:
        if args.command == "show":
            sys.stdout.write(dump_document(load_document(Inventory, Fleet(args.dir).inventory_path)).decode())
            return 0
        fleet = run(args)
    except AgentError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1
    for path in fleet.written:
        print(f"wrote {path}")
    if not fleet.written:
        print("nothing to do: already up to date", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

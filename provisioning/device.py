"""The device's side of provisioning: ``provisioning/provision-device``, run as root on each device.

It writes ``/etc/edge-agent/agent.toml`` from the fleet template, has ``edge-agent identity init`` create
(or find) the device key in the TPM and a CSR for it, creates the two TLS keys the broker connections
need as files (the agent's client key and the device broker's server key), writes the systemd drop-in
that caps the agent's memory at its profile's ceiling, and prints the JSON record the operator feeds to
``fleet sign-csr`` and ``fleet issue-broker-creds``. Running it again changes nothing and keeps the
device id: it is taken from the existing configuration.

``--root`` puts every file under another directory, for tests and image builds.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import socket
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.config import default_device_id
from agent.config_loader import load_settings_with_sources, read_toml
from agent.errors import AgentError, ProvisioningError
from provisioning import ca as x509ca
from provisioning.records import DEPLOY_RELEASE_PREFIX, DEPLOY_ROOT_FILE, DeviceRecord, dump_document, write_if_changed

TEMPLATE = Path(__file__).resolve().parent / "agent.toml.template"
SERVICE_USER = "edge-agent"
BROKER_USER = "mosquitto"
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----[A-Za-z0-9+/=\s]+?-----END \1-----")


class DeviceLayout:
    """Where provisioning puts things, under ``root`` (``/`` on a device)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    @property
    def config(self) -> Path:
        return self.path("/etc/edge-agent/agent.toml")

    @property
    def tls_dir(self) -> Path:
        """The agent's TLS files; fleet/devices/<id>/edge-agent/ from the operator goes here."""
        return self.path("/etc/edge-agent/tls")

    @property
    def broker_dir(self) -> Path:
        """The device broker's TLS files and ACL; fleet/devices/<id>/mosquitto/ goes here."""
        return self.path("/etc/mosquitto/edge-agent")

    @property
    def agent_key(self) -> Path:
        return self.tls_dir / "agent-key.pem"

    @property
    def broker_key(self) -> Path:
        return self.broker_dir / "broker-key.pem"

    @property
    def memory_dropin(self) -> Path:
        return self.path("/etc/systemd/system/edge-agent.service.d/memory.conf")


def provision(
    layout: DeviceLayout,
    *,
    device_id: str | None,
    profile: str | None,
    signing_backend: str | None,
    broker_names: list[str],
    edge_agent: Path,
    template: Path = TEMPLATE,
    certificates: Path | None = None,
    groups: list[str] | None = None,
) -> DeviceRecord:
    """Provision this device (idempotently) and return its record for the fleet inventory.

    ``device_id``, ``profile`` and ``signing_backend`` default to the existing configuration's, else to the
    host name, ``auto`` and ``tpm``. ``certificates`` is the directory the fleet made for this device
    (``fleet/devices/<id>``); when given, its files are checked against this device's keys and put in place.
    """
    existing = read_toml(layout.config) if layout.config.exists() else {}
    device_id = _settle_device_id(existing, device_id, layout.config)
    profile = profile or existing.get("profile") or "auto"
    signing_backend = signing_backend or existing.get("signing", {}).get("backend") or "tpm"
    prefix = "" if layout.root == Path("/") else str(layout.root)
    if groups is None:
        groups = list(existing.get("deploy", {}).get("groups", []))
    values = {"device_id": device_id, "profile": profile, "signing_backend": signing_backend, "root": prefix,
              "deploy": deploy_section(layout, certificates, groups)}  # fmt: skip
    try:
        config = string.Template(template.read_text()).substitute(values)
    except (OSError, KeyError, ValueError) as exc:
        raise ProvisioningError(f"{template}: cannot fill in the template ({exc!r})") from None
    write_if_changed(layout.config, config.encode("utf-8"), 0o640)
    _give_to(layout.config, group_only=True)

    effective = load_settings_with_sources(layout.config)
    settings = effective.settings
    backend = settings.signing.backend
    if backend == "none":
        raise ProvisioningError(f'{layout.config}: signing.backend is "none"; a fleet device needs a key')
    profile_name = effective.profile.name if effective.profile else "default"
    public_key_pem, identity_csr_pem = _run_identity_init(edge_agent, layout.config)
    _give_to(settings.data_dir, recursive=True)

    agent_csr = _tls_key_and_csr(layout.agent_key, device_id, SERVICE_USER)
    broker_csr = _tls_key_and_csr(layout.broker_key, device_id, BROKER_USER)

    dropin = (
        f"# Written by provision-device: limits.process_memory_mb of profile {profile_name!r}.\n"
        "# It takes effect only where the memory cgroup controller is on (some Raspberry Pi kernels need\n"
        "# cgroup_enable=memory in cmdline.txt).\n"
        f"[Service]\nMemoryMax={settings.limits.process_memory_mb}M\n"
    )
    write_if_changed(layout.memory_dropin, dropin.encode("utf-8"))

    public_key = x509ca.load_csr(identity_csr_pem, "the CSR from `edge-agent identity init`").public_key
    hostname = socket.gethostname()
    record = DeviceRecord(
        device_id=device_id,
        profile=profile_name,
        signing_backend=backend,
        public_key_pem=public_key_pem,
        public_key_sha256=x509ca.public_key_sha256(public_key),
        identity_csr_pem=identity_csr_pem,
        agent_tls_csr_pem=agent_csr.decode("ascii"),
        broker_tls_csr_pem=broker_csr.decode("ascii"),
        broker_names=list(dict.fromkeys([hostname, f"{hostname}.local", *broker_names])),
        groups=groups,
    )
    if certificates is not None:
        install_certificates(layout, certificates, record.public_key_sha256)
    return record


def deploy_section(layout: DeviceLayout, certificates: Path | None, groups: list[str]) -> str:
    """The ``[deploy]`` section: the device's groups and the fleet's release keys (from ``fleet init-release-key``,
    copied by ``fleet sign-csr`` beside the device's certificates); empty when there is neither."""
    source = certificates / "edge-agent" if certificates is not None else layout.tls_dir
    release = sorted(path.name for path in source.glob(f"{DEPLOY_RELEASE_PREFIX}*.pem"))
    has_root = (source / DEPLOY_ROOT_FILE).exists()
    if not (release or has_root or groups):
        return ""
    trusted = ", ".join(json.dumps(str(layout.tls_dir / name)) for name in release)
    root = f"root_key = {json.dumps(str(layout.tls_dir / DEPLOY_ROOT_FILE))}\n" if has_root else ""
    return (
        "\n# Fleet model deployments (docs/deploy.md): the release keys, the root key of the key lists, the groups.\n"
        f"[deploy]\ntrusted_keys = [{trusted}]\n{root}groups = {json.dumps(groups)}\n"
    )


def install_certificates(layout: DeviceLayout, bundle: Path, identity_sha256: str) -> None:
    """Put the fleet's files for this device in place, after checking each certificate fits this device's key:
    a bundle for another device (or from before a key change) would otherwise lock the agent out."""
    pairs = (
        (bundle / "edge-agent" / "agent.pem", _key_sha256(layout.agent_key)),
        (bundle / "mosquitto" / "broker.pem", _key_sha256(layout.broker_key)),
        (bundle / "edge-agent" / "device.pem", identity_sha256),
    )
    for certificate_path, key_sha256 in pairs:
        try:
            certified = x509ca.load_certificate(certificate_path).public_key()
        except (OSError, ValueError) as exc:
            raise ProvisioningError(f"{certificate_path}: {exc}") from None
        if x509ca.public_key_sha256(certified) != key_sha256:
            raise ProvisioningError(f"{certificate_path} certifies another key than this device's: wrong bundle?")
    for source_dir, target_dir in ((bundle / "edge-agent", layout.tls_dir), (bundle / "mosquitto", layout.broker_dir)):
        for source in sorted(source_dir.iterdir()):
            write_if_changed(target_dir / source.name, source.read_bytes())


def _settle_device_id(existing: dict[str, Any], requested: str | None, config: Path) -> str:
    """The id in an existing configuration wins: a device keeps its id; asking for another one is an error."""
    current = existing.get("device_id")
    if current is not None and requested is not None and requested != current:
        raise ProvisioningError(
            f"{config} already names this device {current!r}; a new id makes a new device: remove the file first"
        )
    return str(current or requested or default_device_id())


def parse_identity_output(output: str) -> tuple[str, str]:
    """The public key and the CSR (PEM blocks) that ``edge-agent identity init`` prints on stdout."""
    blocks = {match.group(1): match.group(0) + "\n" for match in _PEM_BLOCK.finditer(output)}
    if "PUBLIC KEY" not in blocks or "CERTIFICATE REQUEST" not in blocks:
        raise ProvisioningError("`edge-agent identity init` printed no public key and CSR")
    return blocks["PUBLIC KEY"], blocks["CERTIFICATE REQUEST"]


def _key_sha256(key_file: Path) -> str:
    return x509ca.public_key_sha256(x509ca.load_private_key(key_file).public_key())


def _run_identity_init(edge_agent: Path, config: Path) -> tuple[str, str]:
    output = _run(edge_agent, "identity", "init", "--config", str(config))
    return parse_identity_output(output)


def _run(edge_agent: Path, *args: str) -> str:
    try:
        done = subprocess.run([str(edge_agent), *args], capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise ProvisioningError(f"cannot run {edge_agent}: {exc}") from None
    if done.returncode != 0:
        raise ProvisioningError(f"`edge-agent {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def _tls_key_and_csr(path: Path, common_name: str, owner: str) -> bytes:
    """Load or create a P-256 key file only ``owner`` may read, and a CSR for it."""
    if path.exists():
        key = x509ca.load_private_key(path)
    else:
        key = x509ca.new_key()
        write_if_changed(path, x509ca.private_key_pem(key), 0o600)
    _give_to(path, user=owner)
    return x509ca.build_csr(key, common_name)


def _give_to(path: Path, *, user: str = SERVICE_USER, recursive: bool = False, group_only: bool = False) -> None:
    """Hand ``path`` to a service account when running as root and the account exists (not in tests)."""
    if os.geteuid() != 0 or not path.exists():
        return
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return
    uid = -1 if group_only else account.pw_uid
    paths = [path, *path.rglob("*")] if recursive and path.is_dir() else [path]
    for each in paths:
        os.chown(each, uid, account.pw_gid, follow_symlinks=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="provision-device", description="Provision this device for the fleet.")
    parser.add_argument("--root", type=Path, default=Path("/"), help="install under this directory (tests)")
    parser.add_argument("--device-id", help="default: the id already configured, else the host name")
    parser.add_argument("--profile", help="hardware profile (default: as configured, else detect the board)")
    parser.add_argument("--signing-backend", choices=["tpm", "software"], help="default: as configured, else tpm")
    parser.add_argument("--broker-name", action="append", default=[], help="another name clients reach the broker by")
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument(
        "--edge-agent", type=Path, default=Path(sys.executable).parent / "edge-agent", help="the agent's command"
    )
    parser.add_argument("--record-out", type=Path, help="write the JSON record here instead of stdout")
    parser.add_argument("--certificates", type=Path, help="install the fleet's fleet/devices/<id> directory")
    parser.add_argument("--group", action="append", help="a deployment group (repeatable; default: as configured)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = provision(
            DeviceLayout(args.root),
            device_id=args.device_id,
            profile=args.profile,
            signing_backend=args.signing_backend,
            broker_names=args.broker_name,
            edge_agent=args.edge_agent,
            template=args.template,
            certificates=args.certificates,
            groups=args.group,
        )
    except AgentError as exc:
        print(f"provision-device: {exc}", file=sys.stderr)
        return 1
    if args.record_out:
        write_if_changed(args.record_out, dump_document(record))
    else:
        sys.stdout.write(dump_document(record).decode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

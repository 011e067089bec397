"""Fleet provisioning end to end: a device provisioned with swtpm as its TPM, the fleet CA, and a real
mosquitto configured by systemd/mosquitto-edge-agent.conf with the certificates and ACL the fleet made.

Covers: the agent connecting with its certificate and serving a request, unknown / identity-CA / revoked
certificates refused, clients kept off each other's request and answer topics, and every fleet and
provisioning command changing nothing when run again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agent.app import Agent
from agent.config import BUNDLED_MODELS_DIR, LocalBroker, TlsSettings
from agent.config_loader import load_settings
from agent.deploy.trust import load_public_key, public_pem
from agent.errors import ProvisioningError
from agent.mqtt.localbroker import MosquittoProcess, free_port
from agent.mqtt.transport import new_client
from agent.signing.swtpm import SwtpmProcess
from agent.tools.client import DeviceClient
from provisioning import ca as x509ca
from provisioning import device, fleet
from provisioning.fleet import Fleet
from provisioning.rollout.release import ReleaseKeys
from provisioning.records import DeviceRecord, Inventory, load_document

REPO = Path(__file__).resolve().parents[1]
DROPIN = REPO / "systemd" / "mosquitto-edge-agent.conf"
EDGE_AGENT = Path(sys.executable).parent / "edge-agent"
MANIFEST = json.loads((BUNDLED_MODELS_DIR / "manifest.json").read_text())
EXAMPLE_MODEL = MANIFEST["models"][0]
NOT_AUTHORIZED = 0x87


@dataclass(frozen=True)
class Credentials:
    ca: Path
    cert: Path
    key: Path

    def tls(self) -> TlsSettings:
        return TlsSettings(ca_file=self.ca, cert_file=self.cert, key_file=self.key)


@dataclass
class Site:
    """One fleet and one device (dev1, TPM identity) provisioned with it, certificates installed."""

    fleet: Fleet
    layout: device.DeviceLayout
    foreign: Fleet

    def client(self, name: str, owner: Fleet | None = None) -> Credentials:
        directory = (owner or self.fleet).client_dir(name)
        return Credentials(
            self.fleet.ca_certificate_path("broker"), directory / "client.pem", directory / "client-key.pem"
        )

    @property
    def agent(self) -> Credentials:
        tls = self.layout.tls_dir
        return Credentials(tls / "broker-ca.pem", tls / "agent.pem", tls / "agent-key.pem")


def software_record(
    device_id: str,
    identity_key: ec.EllipticCurvePrivateKey | None = None,
    agent_key: ec.EllipticCurvePrivateKey | None = None,
) -> DeviceRecord:
    """A record as provision-device emits it, with keys made here: for tests of the fleet side alone."""
    identity_key = identity_key or x509ca.new_key()
    return DeviceRecord(
        device_id=device_id,
        profile="default",
        signing_backend="software",
        public_key_pem="",
        public_key_sha256=x509ca.public_key_sha256(identity_key.public_key()),
        identity_csr_pem=x509ca.build_csr(identity_key, device_id).decode(),
        agent_tls_csr_pem=x509ca.build_csr(agent_key or x509ca.new_key(), device_id).decode(),
        broker_tls_csr_pem=x509ca.build_csr(x509ca.new_key(), device_id).decode(),
        broker_names=["dev-host"],
    )


def provision(layout: device.DeviceLayout, device_id: str | None = "dev1", **extra: object) -> DeviceRecord:
    options: dict = {"profile": "default", "signing_backend": "tpm", "broker_names": [], "edge_agent": EDGE_AGENT}
    return device.provision(layout, device_id=device_id, **{**options, **extra})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed")
    base = tmp_path_factory.mktemp("fleet")
    tpm = SwtpmProcess(base / "swtpm").start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("EDGE_AGENT_SIGNING__TCTI", tpm.tcti)
            operator = Fleet(base / "fleet")
            operator.init_ca("test")
            layout = device.DeviceLayout(base / "dev1-root")
            operator.sign_csr(record := provision(layout))
            operator.issue_broker_creds(record, ["alice", "bob"])
            provision(layout, certificates=operator.device_dir("dev1"))
            foreign = Fleet(base / "foreign")
            foreign.init_ca("foreign")
            foreign.issue_broker_creds(None, ["alice"])
            yield Site(operator, layout, foreign)
    finally:
        tpm.close()


@pytest.fixture
def broker(site: Site, tmp_path: Path) -> Iterator[MosquittoProcess]:
    """mosquitto with the shipped drop-in, pointed at the device's installed files and a free port."""
    port = free_port()
    config = DROPIN.read_text().replace("/etc/mosquitto/edge-agent/", f"{site.layout.broker_dir}/")
    assert config.count("\nlistener 8883\n") == 1
    config = config.replace("\nlistener 8883\n", f"\nlistener {port} 127.0.0.1\n")
    process = MosquittoProcess(tmp_path / "broker", port=port, listener_config=config).start()
    yield process
    process.close()


@pytest.fixture
def agent(site: Site, broker: MosquittoProcess) -> Iterator[Agent]:
    """The device's agent, configured by the agent.toml provisioning wrote, on the test broker's port."""
    overrides = {"local": {"port": broker.port}, "models_dir": str(BUNDLED_MODELS_DIR)}
    running = Agent(load_settings(site.layout.config, overrides))
    running.start()
    yield running
    running.stop()


def connect(broker: MosquittoProcess, credentials: Credentials, client_id: str) -> mqtt.Client:
    """A connected MQTT 5 client; raises AssertionError if the broker refuses it."""
    client, reason = attempt(broker, credentials, client_id)
    assert client is not None, f"{client_id} was refused: {reason}"
    return client


def attempt(broker: MosquittoProcess, credentials: Credentials, client_id: str) -> tuple[mqtt.Client | None, str]:
    """Try to connect; the broker's answer is a CONNACK or, for a refused certificate, a closed connection."""
    client = new_client(client_id)
    client.tls_set(ca_certs=str(credentials.ca), certfile=str(credentials.cert), keyfile=str(credentials.key))
    outcome: list[str] = []
    client.on_connect = lambda c, u, flags, reason, p: outcome.append(
        "accepted" if not reason.is_failure else str(reason)
    )
    client.on_disconnect = lambda c, u, flags, reason, p: outcome.append(f"disconnected: {reason}")
    try:
        client.connect(broker.host, broker.port)
        deadline = time.monotonic() + 10
        while not outcome and time.monotonic() < deadline:
            client.loop(timeout=0.05)
    except OSError as exc:  # includes ssl.SSLError
        outcome.append(f"refused: {exc}")
    if outcome[:1] == ["accepted"]:
        client.loop_start()
        return client, "accepted"
    client.disconnect()
    return None, outcome[0] if outcome else "no answer"


def publish_reason(client: mqtt.Client, topic: str) -> int:
    """The reason code of the broker's PUBACK for one QoS 1 publish."""
    acked = threading.Event()
    reasons: dict[int, int] = {}

    def on_publish(c: mqtt.Client, userdata: object, mid: int, reason: mqtt.ReasonCode, props: object) -> None:
        reasons[mid] = reason.value
        acked.set()

    client.on_publish = on_publish
    info = client.publish(topic, b"{}", qos=1)
    assert acked.wait(10)
    return reasons[info.mid]


def subscribe_reasons(client: mqtt.Client, *filters: str) -> list[int]:
    granted = threading.Event()
    reasons: list[int] = []
    client.on_subscribe = lambda c, u, mid, codes, p: (reasons.extend(code.value for code in codes), granted.set())
    client.subscribe([(topic, 1) for topic in filters])
    assert granted.wait(10)
    return reasons


def close(*clients: mqtt.Client) -> None:
    for client in clients:
        client.disconnect()
        client.loop_stop()


def example_call(client: DeviceClient) -> dict:
    example = EXAMPLE_MODEL["examples"][0]
    reply = client.call("infer", {"model": EXAMPLE_MODEL["id"], "inputs": example["inputs"]})
    assert reply["result"]["top"][0]["label"] == example["expect"], reply
    return reply


def test_provisioned_device_serves_a_client_over_mutual_tls(site: Site, broker: MosquittoProcess, agent: Agent) -> None:
    tls = LocalBroker(host=broker.host, port=broker.port, tls=site.client("alice").tls())
    with DeviceClient(tls, "dev1", "alice") as alice:
        example_call(alice)
    certificate = x509ca.load_certificate(site.agent.cert)
    assert certificate.subject.rfc4514_string() == "CN=dev1"


def test_client_cannot_request_as_another_client(site: Site, broker: MosquittoProcess) -> None:
    bob = connect(broker, site.client("bob"), "bob")
    try:
        assert publish_reason(bob, "mcp/req/dev1/bob") < 0x80
        assert publish_reason(bob, "mcp/req/dev1/alice") == NOT_AUTHORIZED
        # The client id a client picks for itself changes nothing: the certificate's name decides.
        assert publish_reason(bob, "mcp/req/dev1/bob/extra") == NOT_AUTHORIZED
    finally:
        close(bob)


def test_client_cannot_read_or_forge_another_clients_answers(
    site: Site, broker: MosquittoProcess, agent: Agent
) -> None:
    spy = connect(broker, site.client("bob"), "bob-spy")
    seen: list[str] = []
    spy.on_message = lambda c, u, message: seen.append(message.topic)
    # mosquitto 2.0 grants these subscriptions and applies the read ACL to each message it would deliver.
    assert all(
        reason < 0x80 for reason in subscribe_reasons(spy, "mcp/res/dev1/alice", "mcp/res/#", "mcp/res/dev1/bob")
    )
    try:
        assert publish_reason(spy, "mcp/res/dev1/alice") == NOT_AUTHORIZED
        assert publish_reason(spy, "mcp/status/dev1") == NOT_AUTHORIZED
        assert publish_reason(spy, "mcp/req/dev1/bob") < 0x80  # bob's own request: answered below
        alice_tls = LocalBroker(host=broker.host, port=broker.port, tls=site.client("alice").tls())
        with DeviceClient(alice_tls, "dev1", "alice") as alice:
            example_call(alice)
        bob_tls = LocalBroker(host=broker.host, port=broker.port, tls=site.client("bob").tls())
        with DeviceClient(bob_tls, "dev1", "bob") as bob:
            example_call(bob)
        # The agent answered alice before bob, and the broker delivers in order: once bob's answer has
        # reached the spy, alice's would have too, had the ACL let it through.
        deadline = time.monotonic() + 10
        while seen.count("mcp/res/dev1/bob") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "mcp/res/dev1/alice" not in seen
        assert set(seen) == {"mcp/res/dev1/bob"} and len(seen) >= 2, seen
    finally:
        close(spy)


def test_certificates_of_another_ca_or_the_identity_ca_are_refused(site: Site, broker: MosquittoProcess) -> None:
    foreign, reason = attempt(broker, site.client("alice", site.foreign), "alice")
    assert foreign is None, "a certificate from another fleet's CA was accepted"
    # A device identity certificate chains to the fleet's identity CA, which brokers must not trust: a
    # device key is a CA and could mint certificates for any name. Refused twice over: the broker trusts
    # only the broker CA, and its CRL check finds no CRL for any other issuer.
    identity_key = x509ca.new_key()
    site.fleet.sign_csr(software_record("dev9", identity_key))
    key_file = site.layout.root.parent / "dev9-identity-key.pem"
    key_file.write_bytes(x509ca.private_key_pem(identity_key))
    identity = Credentials(site.agent.ca, site.fleet.device_dir("dev9") / "edge-agent" / "device.pem", key_file)
    client, reason = attempt(broker, identity, "dev9")
    assert client is None, "a device identity certificate was accepted as a TLS client certificate"


def test_revoked_client_and_device_are_refused(site: Site, broker: MosquittoProcess, tmp_path: Path) -> None:
    site.fleet.issue_broker_creds(None, ["carol"])
    dev8_agent_key = x509ca.new_key()
    dev8 = software_record("dev8", agent_key=dev8_agent_key)
    site.fleet.sign_csr(dev8)
    site.fleet.issue_broker_creds(dev8)
    (tmp_path / "dev8-agent-key.pem").write_bytes(x509ca.private_key_pem(dev8_agent_key))
    dev8_cert = site.fleet.device_dir("dev8") / "edge-agent" / "agent.pem"
    dev8_agent = Credentials(site.agent.ca, dev8_cert, tmp_path / "dev8-agent-key.pem")
    close(connect(broker, site.client("carol"), "carol"), connect(broker, dev8_agent, "dev8"))

    site.fleet.revoke_client("carol")
    site.fleet.revoke_device("dev8")
    # What the operator does on each device: install the new CRL from the bundle, reload mosquitto.
    shutil.copyfile(site.fleet.device_dir("dev1") / "mosquitto" / "crl.pem", site.layout.broker_dir / "crl.pem")
    broker.restart()

    assert attempt(broker, site.client("carol"), "carol")[0] is None, "a revoked client was accepted"
    assert attempt(broker, dev8_agent, "dev8")[0] is None, "a revoked device's agent was accepted"
    close(connect(broker, site.client("alice"), "alice"), connect(broker, site.agent, "dev1"))
    inventory = load_document(Inventory, site.fleet.inventory_path)
    assert inventory.devices["dev8"].status == "revoked" and inventory.clients["carol"].status == "revoked"
    identity_crl = x509.load_pem_x509_crl(site.fleet.crl_path("identity").read_bytes())
    assert identity_crl.get_revoked_certificate_by_serial_number(int(inventory.devices["dev8"].identity.serial, 16))


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        str(path.relative_to(root)): (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_mode)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_fleet_commands_change_nothing_when_repeated(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    record_path = tmp_path / "dev1.json"
    record_path.write_text(software_record("dev1").model_dump_json())
    commands = [
        ["init-ca"],
        ["sign-csr", str(record_path)],
        ["issue-broker-creds", "--record", str(record_path), "--client", "alice", "--client", "bob"],
        ["revoke", "--client", "bob"],
        ["revoke", "--device", "dev1"],
    ]
    wrapper = subprocess.run(
        [REPO / "provisioning" / "fleet", "--dir", root, *commands[0]], capture_output=True, text=True, timeout=60
    )
    assert wrapper.returncode == 0 and "wrote" in wrapper.stdout, wrapper.stderr
    for number, command in enumerate(commands):
        if number:
            assert fleet.run(fleet.build_parser().parse_args(["--dir", str(root), *command])).written, command
        before = snapshot(root)
        assert fleet.run(fleet.build_parser().parse_args(["--dir", str(root), *command])).written == [], command
        assert snapshot(root) == before, command
    assert fleet.main(["--dir", str(root), "init-ca"]) == 0


def test_reprovisioned_device_keeps_its_id_and_its_certificate(
    tmp_path: Path, swtpm: SwtpmProcess, monkeypatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT_SIGNING__TCTI", swtpm.tcti)
    operator = Fleet(tmp_path / "fleet")
    operator.init_ca("test")
    layout = device.DeviceLayout(tmp_path / "root")
    first = provision(layout, device_id="pi-17", broker_names=["pi-17.lan"])
    entry = operator.sign_csr(first)
    operator.issue_broker_creds(first)
    provision(layout, device_id=None, broker_names=["pi-17.lan"], certificates=operator.device_dir("pi-17"))
    before = snapshot(layout.root)

    # Again with nothing but the root: id, profile and signing backend come from the configuration.
    arguments = ["--root", str(layout.root), "--broker-name", "pi-17.lan", "--record-out", str(tmp_path / "pi-17.json")]
    assert device.main([*arguments, "--certificates", str(operator.device_dir("pi-17"))]) == 0
    again = load_document(DeviceRecord, tmp_path / "pi-17.json")
    assert again.device_id == "pi-17" and again.public_key_sha256 == first.public_key_sha256
    assert snapshot(layout.root) == before
    repeat = Fleet(operator.root)
    assert repeat.sign_csr(again).identity == entry.identity
    repeat.issue_broker_creds(again)
    assert repeat.written == []
    with pytest.raises(ProvisioningError, match="already names this device 'pi-17'"):
        provision(layout, device_id="pi-18")

    config = load_settings(layout.config)
    assert config.device_id == "pi-17" and config.signing.backend == "tpm"
    assert isinstance(config.local.tls, TlsSettings) and config.local.tls.key_file == layout.agent_key
    assert oct(layout.agent_key.stat().st_mode & 0o777) == "0o600"
    server = x509ca.load_certificate(layout.broker_dir / "broker.pem")
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"pi-17", "pi-17.lan", "localhost"} <= set(names.get_values_for_type(x509.DNSName))


def test_a_new_key_supersedes_the_old_certificate_under_the_same_id(tmp_path: Path) -> None:
    operator = Fleet(tmp_path / "fleet")
    operator.init_ca("test")
    old = operator.sign_csr(software_record("dev1"))
    new = operator.sign_csr(software_record("dev1"))
    assert new.identity.serial != old.identity.serial
    inventory = load_document(Inventory, operator.inventory_path)
    assert list(inventory.devices) == ["dev1"]
    crl = x509.load_pem_x509_crl(operator.crl_path("identity").read_bytes())
    revoked = crl.get_revoked_certificate_by_serial_number(int(old.identity.serial, 16))
    assert revoked is not None
    assert revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.superseded


def test_fleet_refuses_what_would_confuse_identities(tmp_path: Path) -> None:
    operator = Fleet(tmp_path / "fleet")
    with pytest.raises(ProvisioningError, match="init-ca"):
        operator.sign_csr(software_record("dev1"))
    operator.init_ca("test")
    key = x509ca.new_key()
    operator.sign_csr(software_record("dev1", key))
    operator.issue_broker_creds(None, ["alice"])
    with pytest.raises(ProvisioningError, match="device id"):
        operator.issue_broker_creds(None, ["dev1"])  # would hold the agent's rights in dev1's ACL
    with pytest.raises(ProvisioningError, match="client's name"):
        operator.sign_csr(software_record("alice"))
    with pytest.raises(ProvisioningError, match="already certified for device 'dev1'"):
        operator.sign_csr(software_record("dev2", key))  # a cloned identity
    mismatched = software_record("dev3").model_copy(update={"identity_csr_pem": x509ca.build_csr(key, "dev1").decode()})
    with pytest.raises(ProvisioningError, match="names 'dev1'"):
        operator.sign_csr(mismatched)
    operator.revoke_client("alice")
    with pytest.raises(ProvisioningError, match="revoked"):
        operator.issue_broker_creds(None, ["alice"])


def test_install_stages_the_package_files_under_destdir(tmp_path: Path) -> None:
    environment = {**os.environ, "DESTDIR": str(tmp_path), "INSTALL_VENV": "no"}
    for _ in range(2):  # the second run must succeed over the first one's files
        done = subprocess.run([REPO / "provisioning" / "install.sh"], env=environment, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "etc/systemd/system/edge-agent.service").read_bytes() == (
        REPO / "systemd/edge-agent.service"
    ).read_bytes()
    assert (tmp_path / "etc/mosquitto/conf.d/edge-agent.conf").read_bytes() == DROPIN.read_bytes()
    assert (tmp_path / "var/lib/edge-agent/models").is_dir()
    assert os.access(tmp_path / "opt/edge-agent/provisioning/provision-device", os.X_OK)


class FleetMachine(RuleBasedStateMachine):
    """Any sequence of fleet commands: repeating the last one writes nothing, and the CRLs list exactly
    the revoked and superseded certificates."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="fleet-machine-"))
        Fleet(self.directory).init_ca("machine")
        self.keys = {name: x509ca.new_key() for name in ("d1", "d2")}

    def _repeat_is_a_no_op(self, command) -> None:
        first = Fleet(self.directory)
        try:
            command(first)
        except ProvisioningError:
            return
        again = Fleet(self.directory)
        command(again)
        assert again.written == []

    @rule(device=st.sampled_from(["d1", "d2"]), new_key=st.booleans())
    def enrol(self, device: str, new_key: bool) -> None:
        if new_key:
            self.keys[device] = x509ca.new_key()
        record = software_record(device, self.keys[device])
        self._repeat_is_a_no_op(lambda operator: (operator.sign_csr(record), operator.issue_broker_creds(record)))

    @rule(client=st.sampled_from(["c1", "c2"]))
    def issue_client(self, client: str) -> None:
        self._repeat_is_a_no_op(lambda operator: operator.issue_broker_creds(None, [client]))

    @rule(name=st.sampled_from(["d1", "d2", "c1", "c2"]))
    def revoke(self, name: str) -> None:
        self._repeat_is_a_no_op(
            lambda operator: operator.revoke_device(name) if name.startswith("d") else operator.revoke_client(name)
        )

    @invariant()
    def crls_list_exactly_the_dead_certificates(self) -> None:
        operator = Fleet(self.directory)
        inventory = load_document(Inventory, operator.inventory_path)
        live: dict[str, set[int]] = {"identity": set(), "broker": set()}
        for entry in inventory.devices.values():
            if entry.status == "active":
                live["identity"].add(int(entry.identity.serial, 16))
                live["broker"].update(int(c.serial, 16) for c in (entry.agent_tls, entry.broker_tls) if c)
        live["broker"].update(int(c.tls.serial, 16) for c in inventory.clients.values() if c.status == "active")
        for ca in ("identity", "broker"):
            listed = {entry.serial_number for entry in x509.load_pem_x509_crl(operator.crl_path(ca).read_bytes())}
            assert listed == {int(r.serial, 16) for r in inventory.revocations if r.ca == ca}
            assert not listed & live[ca]

    def teardown(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


FleetMachine.TestCase.settings = settings(
    max_examples=15, stateful_step_count=8, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_fleet_state_machine = FleetMachine.TestCase


def test_provisioned_devices_trust_the_fleets_release_keys(site: Site) -> None:
    keys = ReleaseKeys(site.fleet.root)
    keys.init()
    site.fleet.sign_csr(provision(site.layout, groups=["line-3"]))
    provision(site.layout, certificates=site.fleet.device_dir("dev1"))
    deploy = load_settings(site.layout.config).deploy
    assert deploy.groups == ["line-3"]
    assert [public_pem(load_public_key(key)) for key in deploy.trusted_keys] == keys.trusted_pems()
    assert deploy.root_key is not None and Path(deploy.root_key).read_text() == keys.root_public_path.read_text()
    assert fleet.load_document(fleet.Inventory, site.fleet.inventory_path).devices["dev1"].groups == ["line-3"]
    provision(site.layout)  # again without options: the groups stay
    assert load_settings(site.layout.config).deploy.groups == ["line-3"]

"""The operator's release side without agents: ring plans (property tests), abort criteria, release keys checked by
the device's own trust code, bundles from a model file, the chunk service on a real broker, provisioning files."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import BUNDLED_MODELS_DIR
from agent.deploy.references import reference_mismatch
from agent.deploy.trust import Trust, load_public_key
from agent.errors import DeployError, ProvisioningError
from agent.models.accelerators import load_runtime
from agent.models.inference import LoadedModel
from agent.mqtt.localbroker import MosquittoProcess
from agent.mqtt.transport import new_client
from provisioning import ca as x509ca
from provisioning.fleet import Fleet
from provisioning.fleet import main as fleet_main
from provisioning.ingest.devfleet import enrol_software_device
from provisioning.records import DEPLOY_RELEASE_PREFIX, DEPLOY_ROOT_FILE, DeviceRecord, Inventory, load_document
from provisioning.rollout.bundles import BundleStore, bundle_model_file
from provisioning.rollout.chunks import ChunkService
from provisioning.rollout.cli import inventory_devices
from provisioning.rollout.plan import RolloutPlan, abort_reason, assign_rings
from provisioning.rollout.release import ReleaseKeys
from tests.fixtures.deploy_bundles import MemoryStore
from tests.fixtures.rollout import MODEL_FILE, broker_settings


def device_trust(keys: ReleaseKeys) -> Trust:
    """What a device provisioned now trusts: the root key and the release keys in force."""
    return Trust([load_public_key(pem) for pem in keys.trusted_pems()],
                 load_public_key(str(keys.root_public_path)), MemoryStore())  # fmt: skip


def bundle_with(keys: ReleaseKeys, version: str, tmp_path: Path) -> Any:
    return bundle_model_file(keys.signing_key(), MODEL_FILE, model_id="vibration-anomaly", version=version,
                             task="vibration-anomaly", labels=[], runtime=load_runtime("auto"))  # fmt: skip


@given(
    count=st.integers(min_value=1, max_value=300),
    rings=st.lists(st.one_of(st.integers(1, 50).map(str), st.integers(1, 100).map(lambda p: f"{p}%")), min_size=1,
                   max_size=5),
    ramp=st.sampled_from(["rings", "exponential"]),
)  # fmt: skip
def test_every_device_is_in_exactly_one_ring_in_order(count: int, rings: list[str], ramp: str) -> None:
    devices = [f"d{i}" for i in range(count)]
    plan = RolloutPlan(rings=tuple(rings), ramp=ramp)  # type: ignore[arg-type]
    assigned = assign_rings(devices, plan)
    assert [device for ring in assigned for device in ring] == devices
    assert all(assigned)
    if ramp == "exponential":
        assert [len(ring) for ring in assigned[:-1]] == [2**i for i in range(len(assigned) - 1)]


def test_the_default_rings_are_a_canary_ten_percent_and_the_rest() -> None:
    rings = assign_rings([f"d{i}" for i in range(50)], RolloutPlan())
    assert [len(ring) for ring in rings] == [1, 4, 45]


def test_abort_criteria() -> None:
    plan = RolloutPlan(max_failure_rate=20, min_finished=5)
    assert abort_reason(plan, [(0, "failed")], 1) is not None  # the canary ring failed
    assert abort_reason(plan, [(0, "active"), (1, "failed"), (1, "downloading")], 2) is None  # too few finished
    five = [(0, "active"), (1, "active"), (1, "active"), (1, "failed"), (1, "active"), (1, "sent")]
    assert abort_reason(plan, five, 2) is None  # 1 of 5 is 20 %: not above
    assert "2 of 6" in str(abort_reason(plan, [*five[:-1], (1, "timed_out")], 2))
    with pytest.raises(ValueError):
        RolloutPlan(rings=("0",))


def test_rotation_and_revocation_reach_devices_through_a_root_signed_key_list(tmp_path: Path) -> None:
    keys = ReleaseKeys(tmp_path / "fleet")
    keys.init()
    keys.init()  # idempotent
    device = device_trust(keys)
    first = bundle_with(keys, "2.0.0", tmp_path)
    assert device.verify_manifest(first.envelope).bundle_id == "vibration-anomaly@2.0.0"

    old_kid = keys.kids()[0]
    new_kid = keys.rotate()
    second = bundle_with(keys, "3.0.0", tmp_path)
    with pytest.raises(DeployError, match="not trusted"):
        device.verify_manifest(second.envelope)  # the device has not seen the new key list yet
    assert device.accept_key_list(keys.key_list()).version == 2
    device.verify_manifest(second.envelope)
    device.verify_manifest(first.envelope)  # the old key stays trusted until revoked

    keys.revoke(old_kid)
    assert device.accept_key_list(keys.key_list()).revoked == (old_kid,)
    with pytest.raises(DeployError, match="not trusted"):
        device.verify_manifest(first.envelope)
    with pytest.raises(ProvisioningError, match="signing key"):
        keys.revoke(new_kid)
    assert [load_public_key(pem) for pem in keys.trusted_pems()] and len(keys.trusted_pems()) == 1
    keys.refresh()  # fleet resign-key-list: the same keys, a newer list
    assert device.accept_key_list(keys.key_list()).version == 4


def test_a_bundle_carries_the_entry_models_add_would_write(tmp_path: Path) -> None:
    keys = ReleaseKeys(tmp_path / "fleet")
    keys.init()
    bundle = bundle_with(keys, "2.0.0", tmp_path)
    entry = bundle.manifest.entry
    assert [t.name for t in entry.inputs] == ["features"] and [t.name for t in entry.outputs] == ["probabilities"]
    store = BundleStore(tmp_path / "bundles")
    store.add(bundle)
    store.add(bundle)  # the same bundle again: nothing
    assert store.bundle_ids() == ["vibration-anomaly@2.0.0"]
    other = bundle_with(keys, "2.0.0", tmp_path)  # signed again: another issued_at
    with pytest.raises(ProvisioningError, match="never replaced"):
        store.add(other)
    with pytest.raises(ProvisioningError, match="not a bundle id"):
        store.envelope("../etc@1")


def test_provisioning_files_carry_the_deployment_keys(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "fleet")
    fleet.init_ca("test")
    keys = ReleaseKeys(fleet.root)
    keys.init()
    enrol_software_device(fleet, "pi-1", tmp_path / "pi-1" / "key.pem")
    provisioned = fleet.device_dir("pi-1") / "edge-agent"
    assert (provisioned / DEPLOY_ROOT_FILE).read_text() == keys.root_public_path.read_text()
    assert [p.read_text() for p in provisioned.glob(f"{DEPLOY_RELEASE_PREFIX}*.pem")] == keys.trusted_pems()


class Requester:
    """A device's side of the chunk protocol, by hand."""

    def __init__(self, broker: MosquittoProcess, device_id: str) -> None:
        self.answers: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = new_client(f"requester-{device_id}")
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(f"mcp/files/res/{device_id}", qos=1)
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10)
        self.device_id = device_id

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.answers.append(message)
            self._cond.notify_all()

    def ask(self, payload: bytes, answers: int) -> list[dict[str, Any]]:
        self.client.publish(f"mcp/files/req/{self.device_id}", payload, qos=0)
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.answers) >= answers, 10)
        return [{**dict(m.properties.UserProperty), "payload": m.payload} for m in self.answers]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def served(tmp_path: Path, cloud_broker: MosquittoProcess) -> Iterator[tuple[ChunkService, Any]]:
    keys = ReleaseKeys(tmp_path / "fleet")
    keys.init()
    store = BundleStore(tmp_path / "bundles")
    bundle = bundle_model_file(keys.signing_key(), MODEL_FILE, model_id="vibration-anomaly", version="2.0.0",
                               task="vibration-anomaly", labels=[], runtime=load_runtime("auto"), chunk_size=512)  # fmt: skip
    store.add(bundle)
    service = ChunkService(store, broker_settings(cloud_broker))
    service.start()
    yield service, bundle
    service.stop()


def test_the_chunk_service_answers_chunks_and_refuses_nonsense(
    served: tuple[ChunkService, Any], cloud_broker: MosquittoProcess
) -> None:
    service, bundle = served
    name = bundle.manifest.files[0].name
    device = Requester(cloud_broker, "pi-9")
    try:
        device.client.publish("mcp/files/req/pi-9", b"{not json", qos=0)
        device.client.publish("mcp/files/req/pi-9", json.dumps({"bundle": "x@1", "file": "../a", "chunks": [0]}), qos=0)
        answers = device.ask(json.dumps({"bundle": bundle.manifest.bundle_id, "file": name, "chunks": [2, 0, 99]}).encode(), 2)
        data = (BUNDLED_MODELS_DIR / "vibration_anomaly.tflite").read_bytes()
        assert [(a["chunk"], a["payload"]) for a in answers] == [("2", data[1024:1536]), ("0", data[:512])]
        unknown = device.ask(json.dumps({"bundle": "vibration-anomaly@9.9.9", "file": name, "chunks": [0]}).encode(), 3)
        assert unknown[-1]["error"] == "unknown bundle or file"
        assert service.counts.refused == 3 and service.counts.devices == {"pi-9"}
    finally:
        device.close()


def test_fleet_bundle_measures_the_expected_outputs_of_reference_inputs(tmp_path: Path, capsys: Any) -> None:
    references = tmp_path / "references.json"
    features = [[0.2, 0.62, 3.1, 3.0, 0.5, 0.35, 0.15, 41.0]]
    references.write_text(json.dumps([{"inputs": {"features": features}, "tolerance": 1e-3}]))
    fleet_dir = str(tmp_path / "fleet")
    assert fleet_main(["--dir", fleet_dir, "init-release-key"]) == 0
    assert fleet_main(["--dir", fleet_dir, "bundle", str(MODEL_FILE), "--id", "vibration-anomaly", "--version",
                       "2.0.0", "--reference-inputs", str(references)]) == 0  # fmt: skip
    assert "vibration-anomaly@2.0.0" in capsys.readouterr().out
    manifest = BundleStore(tmp_path / "fleet" / "bundles").manifest("vibration-anomaly@2.0.0")
    case = manifest.references[0]
    assert case.tolerance == 1e-3 and len(case.expected["probabilities"][0]) == 3
    # The device's own check accepts what was measured.
    loaded = LoadedModel(manifest.entry, MODEL_FILE.read_bytes(), runtime=load_runtime("auto"))
    try:
        assert reference_mismatch(loaded, case) is None
    finally:
        loaded.close()
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"inputs": {"nope": features}}]))
    assert fleet_main(["--dir", fleet_dir, "bundle", str(MODEL_FILE), "--id", "vibration-anomaly", "--version",
                       "2.0.1", "--reference-inputs", str(broken)]) == 1  # fmt: skip
    assert "lacks the input" in capsys.readouterr().err


def test_deploy_targets_a_group_or_a_profile_of_the_inventory(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "fleet")
    fleet.init_ca("test")
    for device_id, groups in (("pi-2", ["line-3"]), ("pi-1", ["line-3", "night"]), ("pi-3", [])):
        key = x509ca.new_key()
        csr = x509ca.build_csr(key, device_id).decode()
        fleet.sign_csr(DeviceRecord(
            device_id=device_id, profile="rpi5" if device_id != "pi-3" else "rpi4-1gb", signing_backend="software",
            public_key_pem="", public_key_sha256=x509ca.public_key_sha256(key.public_key()), identity_csr_pem=csr,
            agent_tls_csr_pem=csr, broker_tls_csr_pem=csr, broker_names=[], groups=groups,
        ))  # fmt: skip
    fleet.revoke_device("pi-2")
    inventory = load_document(Inventory, fleet.inventory_path)
    assert inventory_devices(inventory, group="line-3") == ["pi-1"]  # pi-2 is revoked
    assert inventory_devices(inventory, profile="rpi4-1gb") == ["pi-3"]
    with pytest.raises(ProvisioningError, match="group night-2"):
        inventory_devices(inventory, group="night-2")

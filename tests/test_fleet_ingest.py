"""``fleet ingest`` and ``fleet query`` against real mosquitto brokers and real agents sending upstream, on
SQLite and on a private PostgreSQL server: records verified to the inventory's device keys and stored once,
forgeries quarantined, records held until their delegation certificate arrives, nothing lost while the
database is down. (Several workers and killed workers: tests/test_fleet_ingest_scale.py.)"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import Signing
from agent.mqtt.localbroker import MosquittoProcess
from agent.mqtt.transport import new_client
from agent.signing import DelegatedSigner, create_signer
from agent.signing.outgoing import encode_record
from agent.upstream.uplink_wire import UpstreamRecord, decode_upstream
from provisioning import fleet
from provisioning.fleet import Fleet
from provisioning.ingest.devfleet import enrol_software_device
from provisioning.ingest.localpg import PostgresServer
from provisioning.ingest.schema import Certificate, Held, Quarantined, open_database
from provisioning.ingest.store import Incoming, Planned, RecordStore
from provisioning.ingest.trust import CertificateCache, DeviceKeys, Verifier
from tests.fixtures.agents import REPO_ROOT
from tests.fixtures.ingest import Carried, Site, database_url, drained, eventually, infer, stored_ids

def _publish(broker: MosquittoProcess, messages: list[tuple[str, bytes, dict[str, str]]]) -> None:
    """Publish upstream messages at QoS 1 as a device's uplink would, waiting for every PUBACK."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = new_client(f"replayer-{uuid.uuid4().hex[:8]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload, user_properties in messages:
            properties = Properties(PacketTypes.PUBLISH)
            properties.UserProperty = list(user_properties.items()) or [("msg-id", "none")]
            client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _captured(carried: Carried) -> list[tuple[str, bytes, dict[str, str]]]:
    return [
        (m.topic, bytes(m.payload), dict(getattr(m.properties, "UserProperty", None) or [])) for m in carried.messages()
    ]


def _envelope(device_id: str, cls: str, body: dict[str, Any] | bytes, msg_id: str | None = None) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = {"msg_id": msg_id or str(uuid.uuid4()), "class": cls, "seq": 1, "device_id": device_id,
            "enqueued_at": time.time(), "age_ms": 1}  # fmt: skip
    return json.dumps(head).encode()[:-1] + b', "body": ' + raw + b"}"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_real_agents_records_are_verified_stored_once_and_queryable(
    kind: str, site: Site, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    url = database_url(kind, tmp_path, request)
    carried = Carried(site.cloud)
    # The workers' session exists before the devices send: what the broker gets before has no subscriber.
    with site.workers(url, 1) as (worker,):
        by_thumbprint = site.agent("dev2", certificate_header="x5t#S256", cloud={"batch": True, "batch_linger_ms": 50})
        agents = [site.agent("dev1"), by_thumbprint]
        for device_id in ("dev1", "dev2"):
            with site.client(device_id) as client:
                infer(client, 40)
                if device_id == "dev2":
                    assert isinstance(by_thumbprint.signer, DelegatedSigner)
                    by_thumbprint.signer.rotate()  # a new certificate, sent upstream, names the records after it
                    infer(client, 10)
        for agent in agents:
            agent.refresh_status()  # a signed telemetry record
        drained(*agents)
        expected = carried.msg_ids()
        assert eventually(lambda: set(stored_ids()) == expected), worker.stats()
        replay = _captured(carried)
        # The agents batched (the default): zlib-compressed messages of many records, each record stored.
        batches = [m for m in replay if m[0].endswith("/batch") and m[2].get("encoding") == "zlib"]
        assert any(len(decode_upstream(*message)) > 1 for message in batches), [m[0] for m in replay]
        _publish(site.cloud, replay)  # every message again: stored once
        copies = sum(len(decode_upstream(*message)) for message in replay)
        assert eventually(lambda: worker.stats().duplicates == copies), worker.stats()
        stats = worker.stats()
    carried.close()
    assert sorted(stored_ids()) == sorted(expected) and stats.quarantined == {} and Held.select().count() == 0
    assert Certificate.select().where(Certificate.device_id == "dev2").count() == 2

    assert fleet.main(["--dir", str(site.fleet.root), "query", "--db", url, "--device", "dev2", "--kind", "res",
                       "--limit", "1000"]) == 0  # fmt: skip
    shown = json.loads(capsys.readouterr().out)
    assert len(shown) == 50 and {row["signer"] for row in shown} == {"delegated"}
    assert all(row["body"]["reply"]["result"]["_meta"]["device_id"] == "dev2" for row in shown)
    assert all(row["received_at"].endswith("Z") for row in shown)
    for bounds, count in ((["--since", "2100-01-01"], 0), (["--until", "2000-01-01"], 0),
                          (["--since", "2000-01-01", "--until", "2100-01-01T00:00:00+01:00"], 90)):  # fmt: skip
        assert fleet.main(["--dir", str(site.fleet.root), "query", "--db", url, "--kind", "res", "--limit", "1000",
                           *bounds]) == 0  # fmt: skip
        assert len(json.loads(capsys.readouterr().out)) == count, bounds
    assert fleet.main(["--dir", str(site.fleet.root), "query", "--db", url, "--totals"]) == 0
    totals = json.loads(capsys.readouterr().out)
    assert totals["records"]["dev1"]["res"] == 40 and totals["records"]["dev2"]["res"] == 50
    assert totals["quarantined"] == {} and totals["held"] == 0


def test_forged_tampered_and_foreign_records_are_quarantined_with_their_reason(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    carried = Carried(site.cloud)
    agent = site.agent("dev1", cloud={"batch": False})  # single envelopes, to forge and replay one by one
    with site.client("dev1") as client:
        infer(client, 3)
    drained(agent)
    genuine = [m for m in _captured(carried) if m[0].endswith("/res")]
    assert eventually(lambda: len(_captured(carried)) >= 3)
    forger = create_signer(Signing(backend="software", key_file=tmp_path / "forger.pem"), "dev1", tmp_path)
    assert forger is not None
    forged_body = encode_record({"msg_id": "f-1", "device_id": "dev1", "class": "telemetry", "health": {}}, forger)
    topic, payload, properties = genuine[0]
    tampered = json.loads(payload)
    tampered["msg_id"] = "t-1"
    tampered["body"]["reply"]["result"]["top"][0]["score"] = 0.01
    renamed = json.loads(genuine[1][1])
    renamed["body"]["client_id"] = "someone-else"
    renamed["msg_id"] = "r-1"
    stranger_body = encode_record({"msg_id": "s-1", "device_id": "dev9", "class": "telemetry"}, forger)
    hostile = [
        ("mcp/up/dev1/telemetry", _envelope("dev1", "telemetry", forged_body, "f-1"), {}),
        (topic, json.dumps(tampered).encode(), {}),
        (topic, json.dumps(renamed).encode(), {}),
        ("mcp/up/dev9/telemetry", _envelope("dev9", "telemetry", stranger_body, "s-1"), {}),
        ("mcp/up/dev1/telemetry", _envelope("dev2", "telemetry", forged_body, "f-1"), {}),
        ("mcp/up/dev1/res", b"\x00not json", {}),
        ("mcp/up/dev1/res/batch", b"x\x9c\x03\x00", {"encoding": "zlib"}),
    ]
    with site.workers(str(tmp_path / "records.db"), 1) as (worker,):
        _publish(site.cloud, hostile + genuine)
        total = len(hostile) + len(genuine)
        assert eventually(lambda: worker.stats().messages == total and worker.stats().stored == len(genuine)), worker.stats()
        stats = worker.stats()
    carried.close()
    assert stats.quarantined == {
        "foreign_certificate": 1, "bad_signature": 1, "envelope_mismatch": 1, "unknown_device": 1,
        "device_mismatch": 1, "undecodable": 2,
    }  # fmt: skip
    assert set(stored_ids()) == {json.loads(payload)["msg_id"] for _, payload, _ in genuine}
    reasons = {row.msg_id: row.reason for row in Quarantined.select()}
    assert reasons["f-1"] in ("foreign_certificate", "device_mismatch") and reasons["t-1"] == "bad_signature"
    assert all(row.content and row.detail for row in Quarantined.select())
    assert fleet.main(["--dir", str(site.fleet.root), "query", "--db", str(tmp_path / "records.db"),
                       "--quarantine", "--device", "dev1"]) == 0  # fmt: skip
    shown = json.loads(capsys.readouterr().out)
    assert {row["msg_id"]: row["reason"] for row in shown}.get("t-1") == "bad_signature"
    assert all(row["device_id"] == "dev1" and row["detail"] for row in shown) and len(shown) == 5


def test_records_are_held_until_their_certificate_arrives(site: Site, tmp_path: Path) -> None:
    carried = Carried(site.cloud)
    # Single envelopes, replayed one by one in the order that hurts.
    agent = site.agent("dev1", certificate_header="x5t#S256", cloud={"batch": False})
    with site.client("dev1") as client:
        infer(client, 10)
    drained(agent)
    captured = _captured(carried)
    carried.close()
    certificates = [m for m in captured if m[0].endswith("/audit") and b"delegation_certificate" in m[1]]
    responses = [m for m in captured if m[0].endswith("/res")]
    assert len(certificates) == 1 and len(responses) == 10
    # Another cloud broker, fed in the order that hurts: the certificate after the records it signs.
    replay = MosquittoProcess(tmp_path / "replay-broker").start()
    try:
        from tests.fixtures.ingest import ingest_workers

        with ingest_workers(site.fleet.root, replay, str(tmp_path / "records.db"), 1) as (worker,):
            _publish(replay, responses)
            assert eventually(lambda: worker.stats().held == 10), worker.stats()
            assert stored_ids() == [] and Held.select().count() == 10
            # Another process, as an operator's would be (this one's models are bound to the worker's database).
            shown = subprocess.run(
                [sys.executable, "-m", "provisioning.fleet", "--dir", str(site.fleet.root), "query", "--db",
                 str(tmp_path / "records.db"), "--held"], capture_output=True, check=True, cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            )  # fmt: skip
            held = json.loads(shown.stdout)
            assert len(held) == 10 and all(row["thumbprint"] and row["envelope"]["class"] == "res" for row in held)
            _publish(replay, certificates)
            assert eventually(lambda: len(stored_ids()) == 11), worker.stats()
            # The worker adds a batch's tally to its stats just after the commit that made the rows visible.
            assert eventually(lambda: worker.stats().released == 10), worker.stats()
            assert Held.select().count() == 0
    finally:
        replay.close()


def test_records_arriving_while_the_database_is_down_are_all_stored_after_it_returns(
    site: Site, postgres: PostgresServer
) -> None:
    url = postgres.create_database(f"down{time.monotonic_ns()}")
    carried = Carried(site.cloud)
    buffer = 8
    with site.workers(url, 1, buffer=buffer, batch_max=4) as (worker,):
        agent = site.agent("dev1", cloud={"batch": False})  # one message per record: many more than the buffer
        with site.client("dev1") as client:
            infer(client, 5)
            assert eventually(lambda: worker.stats().stored >= 5)
            postgres.stop()
            try:
                stored_before = worker.stats().stored
                infer(client, 60)
                drained(agent)  # the broker took everything: the records now wait in the worker's session
                assert eventually(lambda: worker.stats().database_retries > 0)

                def unacknowledged() -> int:
                    stats = worker.stats()
                    return stats.received - stats.messages

                # Receive Maximum: the broker hands over as many as the buffer holds and then keeps the rest.
                assert eventually(lambda: unacknowledged() >= buffer), worker.stats()
                for _ in range(20):
                    assert unacknowledged() == buffer, worker.stats()
                    time.sleep(0.05)
                assert worker.stats().stored == stored_before
            finally:
                postgres.start()
            expected = carried.msg_ids()
            assert eventually(lambda: set(stored_ids()) == expected, timeout=60), worker.stats()
    carried.close()
    assert len(expected) == 65 and len(carried.messages()) == 65  # single envelopes


@pytest.fixture(scope="module")
def signed_telemetry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Verifier, dict[str, Any]]:
    """A verifier for device dev1 and a telemetry record dev1 signed."""
    tmp_path = tmp_path_factory.mktemp("signed")
    fleet_dir = tmp_path / "fleet"
    enrol_software_device(Fleet(fleet_dir), "dev1", tmp_path / "dev1.pem")
    signer = create_signer(Signing(backend="software", key_file=tmp_path / "dev1.pem"), "dev1", tmp_path)
    body = {"msg_id": "m-1", "device_id": "dev1", "class": "telemetry", "health": {"rss_mb": 98.5, "ok": True},
            "counters": {"answered": 7, "labels": ["a", "b"]}}  # fmt: skip
    keys = DeviceKeys(fleet_dir / "inventory.json")
    keys.refresh()
    return Verifier(keys, CertificateCache(lambda thumbprint: None)), json.loads(encode_record(body, signer))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)


_MEMBERS = st.sampled_from(["health", "counters", "rss_mb", "ok", "answered", "labels", "new", "msg_id", "class"])


@settings(max_examples=80, deadline=None)
@given(path=st.lists(_MEMBERS, min_size=1, max_size=3), value=_JSON)
def test_any_change_to_a_signed_record_is_quarantined(
    signed_telemetry: tuple[Verifier, dict[str, Any]], path: list[str], value: Any
) -> None:
    verifier, signed = signed_telemetry
    changed = copy.deepcopy(signed)
    holder: Any = changed
    for key in path[:-1]:
        holder = holder.get(key) if isinstance(holder, dict) else None
    if isinstance(holder, dict) and path[-1] != "sig":
        holder[path[-1]] = value
    envelope = {"msg_id": "m-1", "class": "telemetry", "seq": 1, "device_id": "dev1", "enqueued_at": 0, "age_ms": 0}
    verdict = verifier.check("dev1", UpstreamRecord.model_validate({**envelope, "body": changed}), time.time())
    assert verdict.outcome == ("store" if changed == signed else "quarantine"), verdict


def test_a_message_the_database_refuses_is_quarantined_as_unstorable_and_the_rest_stored(tmp_path: Path) -> None:
    database = open_database(str(tmp_path / "records.db"))
    store = RecordStore(database, DeviceKeys(tmp_path / "no-inventory.json"))
    good, bad = Planned(), Planned()
    row = {"msg_id": "m-1", "device_id": "dev1", "kind": "telemetry", "seq": 1, "enqueued_at": 0.0,
           "received_at": 0.0, "signed_at": 0, "signer": "strict", "kid": None, "client_id": None, "method": None,
           "body": "{}"}  # fmt: skip
    good.records.append(row)
    bad.records.append({**row, "msg_id": "m-2", "seq": 2**70})  # beyond SQLite's 64-bit integers
    incoming = Incoming("mcp/up/dev1/telemetry", b"{}", {"msg-id": "m-2"}, 0.0)
    tally = store.write([(incoming, good), (incoming, bad)])
    assert tally.stored == 1 and tally.quarantined == {"unstorable": 1}
    assert stored_ids() == ["m-1"] and Quarantined.get().msg_id == "m-2"
    database.close()

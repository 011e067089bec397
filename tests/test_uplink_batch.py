"""Batching on the cloud uplink (metered links): real cloud broker, real outbox file, and property tests of the
batch encoder/decoder and of the batcher's decisions."""

from __future__ import annotations

import json
import threading
import uuid
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import CloudBroker, OutboxSettings
from agent.errors import UpstreamFormatError
from agent.mqtt.localbroker import MosquittoProcess
from agent.signing import verify_message
from agent.upstream.outbox import Outbox, OutboxRecord
from agent.upstream.uplink import Uplink
from agent.upstream.uplink_batch import Batcher
from agent.upstream.uplink_wire import UpstreamRecord, decode_batch, decode_upstream, encode_batch, encode_envelope
from tests.test_uplink import cloud_settings, enqueue_interleaved, wait_until

DEVICE = "dev-1"


@dataclass(frozen=True)
class Arrival:
    topic: str
    user: dict[str, str]
    expiry: int | None
    records: list[UpstreamRecord]
    payload: bytes


class BatchObserver:
    """A persistent-session cloud subscriber that decodes single and batch messages as docs/cloud.md says."""

    def __init__(self, broker: MosquittoProcess) -> None:
        self.arrivals: list[Arrival] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([("mcp/up/#", 1), ("mcp/cloud/req/#", 1)])
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.3)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, clean_start=False, properties=properties)
        self.client.loop_start()
        assert self._subscribed.wait(10)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        user = dict(getattr(message.properties, "UserProperty", []) or [])
        records = decode_upstream(message.topic, bytes(message.payload), user)
        arrival = Arrival(
            message.topic,
            user,
            getattr(message.properties, "MessageExpiryInterval", None),
            records,
            bytes(message.payload),
        )
        with self._lock:
            self.arrivals.append(arrival)

    def restart_broker(self, broker: MosquittoProcess) -> None:
        """Restart ``broker`` and return once this observer is subscribed again (it reconnects by itself):
        with an ``acl_file``, mosquitto drops what is published to a session restored from persistence before
        its client reconnects (see ``CloudObserver.restart_broker`` in tests/test_uplink.py)."""
        self._subscribed.clear()
        broker.restart()
        assert self._subscribed.wait(30), "the observer did not resubscribe after the broker restart"

    def snapshot(self) -> list[Arrival]:
        with self._lock:
            return list(self.arrivals)

    def msg_ids(self) -> set[str]:
        return {r.msg_id for a in self.snapshot() for r in a.records}

    def first_arrivals(self) -> dict[str, list[str]]:
        """Per class, msg_ids in order of first arrival (repeats dropped, as the cloud would)."""
        order: dict[str, list[str]] = defaultdict(list)
        seen: set[str] = set()
        for arrival in self.snapshot():
            for record in arrival.records:
                if record.msg_id not in seen:
                    seen.add(record.msg_id)
                    order[record.cls].append(record.msg_id)
        return order

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def observer(cloud_broker: MosquittoProcess):
    watcher = BatchObserver(cloud_broker)
    yield watcher
    watcher.close()


@pytest.fixture
def outbox(tmp_path: Path):
    store = Outbox(tmp_path / "outbox.db", OutboxSettings(ttl_s={"telemetry": 600, "fallback": 30}))
    yield store
    store.close()


def batched(broker: MosquittoProcess, **overrides) -> CloudBroker:
    return cloud_settings(broker, **({"batch": True, "batch_linger_ms": 500} | overrides))


def assert_batches_consistent(observer: BatchObserver, enqueued: dict[str, list[str]]) -> None:
    """Exactly the enqueued set arrived, in enqueue order per class after dropping repeats, in zlib batches
    whose properties match their contents; repeats of a record are identical."""
    assert observer.msg_ids() == {m for ids in enqueued.values() for m in ids}
    assert observer.first_arrivals() == dict(enqueued)
    bodies: dict[str, object] = {}
    for arrival in observer.snapshot():
        (cls,) = {r.cls for r in arrival.records}
        assert arrival.topic == f"mcp/up/{DEVICE}/{cls}/batch"
        assert arrival.user["encoding"] == "zlib"
        assert arrival.user["msg-count"] == str(len(arrival.records))
        assert decode_batch(arrival.payload, "zlib").batch_id == arrival.user["batch-id"]
        seqs = [r.seq for r in arrival.records]
        assert seqs == sorted(seqs)
        for record in arrival.records:
            assert record.device_id == DEVICE
            assert bodies.setdefault(record.msg_id, record.body) == record.body


def test_batched_drain_delivers_exactly_the_enqueued_set_in_order_in_compressed_batches(
    cloud_broker: MosquittoProcess, observer: BatchObserver, outbox: Outbox
) -> None:
    enqueued = enqueue_interleaved(outbox, 300)
    uplink = Uplink(outbox, batched(cloud_broker, batch_max_records=40), DEVICE)
    uplink.start()
    wait_until(lambda: outbox.stats().messages == 0, what="outbox drained")
    wait_until(lambda: len(observer.msg_ids()) == 900, what="all records observed")
    assert_batches_consistent(observer, enqueued)
    arrivals = observer.snapshot()
    assert max(len(a.records) for a in arrivals) == 40
    assert len(arrivals) < 900 / 10, "records were not batched"
    assert all(json.loads(zlib.decompress(a.payload))["count"] == len(a.records) for a in arrivals)
    for arrival in arrivals:
        assert (arrival.expiry is not None) == (arrival.records[0].cls == "telemetry")
        if arrival.expiry is not None:
            assert 0 < arrival.expiry <= 600
    wait_until(lambda: uplink.stats().delivered == 900)
    assert uplink.stats().batches == len(arrivals)
    uplink.stop()


def test_fallback_requests_are_not_held_by_lingering_and_stop_flushes_held_records(
    cloud_broker: MosquittoProcess, observer: BatchObserver, outbox: Outbox
) -> None:
    uplink = Uplink(outbox, batched(cloud_broker, batch_linger_ms=600_000), DEVICE)
    uplink.start()
    wait_until(lambda: uplink.state == "connected")
    held = outbox.enqueue("res", b'{"held": true}')
    wait_until(lambda: uplink.stats().buffered == 1, what="response held for its batch")
    forwarded = outbox.enqueue("fallback", b'{"request": {"id": 7}}', ttl_s=20)
    wait_until(lambda: observer.msg_ids() == {forwarded}, what="fallback request delivered")
    (arrival,) = observer.snapshot()
    assert arrival.topic == f"mcp/cloud/req/{DEVICE}"
    assert arrival.user["msg-id"] == forwarded and "encoding" not in arrival.user
    assert 0 < arrival.expiry <= 20
    assert uplink.stats().buffered == 1 and outbox.stats().classes["res"].claimed == 1

    uplink.stop()
    wait_until(lambda: observer.msg_ids() == {forwarded, held}, what="held response flushed at stop")
    assert outbox.stats().messages == 0


def test_cloud_restarts_mid_batched_drain_lose_nothing(
    cloud_broker: MosquittoProcess, observer: BatchObserver, outbox: Outbox
) -> None:
    enqueued = enqueue_interleaved(outbox, 6000, classes=("res", "telemetry"))
    # Small batches and a small window keep the drain long enough to be cut three times.
    uplink = Uplink(outbox, batched(cloud_broker, batch_max_records=4, inflight_window=8), DEVICE)
    uplink.start()
    for restart in range(1, 4):
        wait_until(lambda target=restart * 2000: uplink.stats().delivered >= target, what="drain under way")
        cloud_broker.stop()
        assert outbox.stats().messages > 0, "the drain finished before the broker went down"
        wait_until(lambda: uplink.state != "connected", what="connection loss noticed")
        cloud_broker.start()
    wait_until(lambda: outbox.stats().messages == 0, what="outbox drained")
    wait_until(lambda: len(observer.msg_ids()) == 12000, what="all records observed")
    assert_batches_consistent(observer, enqueued)
    assert uplink.stats().connects >= 4
    uplink.stop()


def test_a_refused_batch_dead_letters_every_row_in_it(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite mcp/up/{DEVICE}/res/batch\ntopic read mcp/up/#\n")
    broker = MosquittoProcess(tmp_path / "broker", extra_config=f"acl_file {acl}\n").start()
    observer = BatchObserver(broker)
    policy = OutboxSettings(dead_letter_retry_s=60, dead_letter_max_attempts=1)
    outbox = Outbox(tmp_path / "outbox.db", policy)
    uplink = Uplink(outbox, batched(broker, batch_max_records=3), DEVICE)
    try:
        enqueued = enqueue_interleaved(outbox, 7, classes=("res", "audit"))
        uplink.start()
        wait_until(lambda: outbox.stats().dead == 7, what="every audit row dead-lettered")
        wait_until(lambda: observer.msg_ids() == set(enqueued["res"]), what="res delivered")
        dead = outbox.peek(state="dead")
        assert [e.msg_id for e in dead] == enqueued["audit"]
        assert {(e.last_reason, e.failures) for e in dead} == {(0x87, 1)}
        assert outbox.stats().dead_lettered == {"audit": 7}
        wait_until(lambda: uplink.stats().refused == 7)

        acl.write_text("topic readwrite mcp/up/#\n")
        observer.restart_broker(broker)
        assert outbox.retry_dead() == 7
        wait_until(lambda: outbox.stats().messages == 0, what="dead letters delivered")
        wait_until(lambda: observer.msg_ids() == set(enqueued["res"] + enqueued["audit"]))
        assert observer.first_arrivals()["audit"] == enqueued["audit"]
    finally:
        uplink.stop()
        outbox.close()
        observer.close()
        broker.close()


def test_agent_with_batching_sends_every_answered_reply_upstream_signed(
    start_agent, client_factory, cloud_broker: MosquittoProcess
) -> None:
    observer = BatchObserver(cloud_broker)
    cloud = {"host": cloud_broker.host, "port": cloud_broker.port, "batch": True, "batch_linger_ms": 500}
    agent = start_agent(cloud=cloud, signing={"backend": "software", "key_file": None}, limits={"intake_queue": 500})
    client = client_factory("alice")
    inputs = {"features": [[0.5, 3.1, 6.2, 8.5, 0.2, 0.3, 0.5, 71.0]]}
    futures = [client.send("infer", {"model": "vibration-anomaly", "inputs": inputs}) for _ in range(120)]
    answered = {future.result(30)["id"] for future in futures}
    try:
        wait_until(lambda: len(observer.msg_ids()) == len(answered), what="every upstream copy observed")
        arrivals = observer.snapshot()
        assert all(a.topic == "mcp/up/dev1/res/batch" for a in arrivals)
        assert len(arrivals) < len(answered)
        records = [r for a in arrivals for r in a.records]
        assert {r.body["reply"]["id"] for r in records} == answered
        for record in records:
            verify_message(record.body["reply"], agent.signer.public_key)
    finally:
        observer.close()


# -- properties of the encoder/decoder and of the batcher -------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def make_record(row_id: int, cls: str, body: object, *, age_s: float = 0.0, ttl: float | None = None) -> OutboxRecord:
    return OutboxRecord(
        id=row_id,
        msg_id=str(uuid.UUID(int=row_id)),
        cls=cls,
        body=json.dumps(body).encode(),
        enqueued_wall=1_700_000_000.0 + row_id,
        age_s=age_s,
        remaining_ttl_s=ttl,
        attempts=1,
    )


@given(
    bodies=st.lists(json_values, min_size=1, max_size=20),
    cls=st.sampled_from(["res", "telemetry", "audit"]),
    compression=st.sampled_from(["zlib", "none"]),
    ages=st.floats(0, 1e6),
)
def test_batch_encoding_round_trips(bodies: list, cls: str, compression: str, ages: float) -> None:
    records = [make_record(i + 1, cls, body, age_s=ages) for i, body in enumerate(bodies)]
    envelopes = [encode_envelope(r, DEVICE) for r in records]
    payload = encode_batch(envelopes, batch_id="b-1", device_id=DEVICE, cls=cls, compression=compression)
    decoded = decode_upstream(f"mcp/up/{DEVICE}/{cls}/batch", payload, {"encoding": compression})
    assert [(r.msg_id, r.seq, r.cls, r.device_id, r.age_ms) for r in decoded] == [
        (r.msg_id, r.id, cls, DEVICE, int(r.age_s * 1000)) for r in records
    ]
    assert [r.body for r in decoded] == bodies
    assert [r.enqueued_at for r in decoded] == [r.enqueued_wall for r in records]


@dataclass(frozen=True)
class AnyRecord:
    """A claimed record with fields the outbox would never produce (any text, non-finite floats, ints)."""

    id: int
    msg_id: str
    cls: str
    body: bytes
    enqueued_wall: float
    age_s: float
    remaining_ttl_s: float | None = None


@settings(deadline=None)
@given(
    msg_id=st.text(),
    cls=st.text(),
    device_id=st.text(),
    row_id=st.integers(),
    enqueued_wall=st.floats() | st.integers(-(2**70), 2**70),
    age_s=st.floats(-1e12, 1e12),
)
def test_the_envelope_is_byte_for_byte_what_json_dumps_gives(
    msg_id: str, cls: str, device_id: str, row_id: int, enqueued_wall: float, age_s: float
) -> None:
    record = AnyRecord(row_id, msg_id, cls, b'{"x":[1,2]}', enqueued_wall, age_s)
    head = {
        "msg_id": msg_id,
        "class": cls,
        "seq": row_id,
        "device_id": device_id,
        "enqueued_at": enqueued_wall,
        "age_ms": int(age_s * 1000),
    }
    expected = json.dumps(head, separators=(",", ":")).encode()[:-1] + b',"body":{"x":[1,2]}}'
    assert encode_envelope(record, device_id) == expected


def test_a_record_as_large_as_a_batch_travels_alone_uncompressed_between_batches() -> None:
    cloud = CloudBroker(host="127.0.0.1", batch=True, batch_max_records=10, batch_max_bytes=4096)
    batcher = Batcher(cloud, DEVICE, clock=FakeClock())
    small = [make_record(i, "res", {"n": i}) for i in (1, 2)]
    large = make_record(3, "res", {"pad": "x" * 5000})
    batcher.add([*small, large, make_record(4, "res", {"n": 4})])
    publications, too_large = batcher.take(10, max_packet=None, flush=True)
    assert too_large == []
    assert [(p.batch, p.row_ids) for p in publications] == [(True, (1, 2)), (False, (3,)), (True, (4,))]
    alone = publications[1]
    assert alone.topic == f"mcp/up/{DEVICE}/res" and alone.payload == encode_envelope(large, DEVICE)
    assert [r.seq for r in decode_upstream(alone.topic, alone.payload, {})] == [3]


def test_decoder_refuses_bombs_truncation_and_unknown_encodings() -> None:
    envelopes = [encode_envelope(make_record(1, "res", {"pad": "x" * 100_000}), DEVICE)]
    payload = encode_batch(envelopes, batch_id="b", device_id=DEVICE, cls="res", compression="zlib")
    assert len(decode_batch(payload, "zlib").records) == 1
    with pytest.raises(UpstreamFormatError, match="inflates beyond"):
        decode_batch(payload, "zlib", max_bytes=10_000)
    with pytest.raises(UpstreamFormatError, match="truncated"):
        decode_batch(payload[:-8], "zlib")
    with pytest.raises(UpstreamFormatError, match="unknown batch encoding"):
        decode_batch(payload, "br")
    with pytest.raises(UpstreamFormatError, match="not a batch envelope"):
        decode_batch(b'{"batch_id": 1}', "none")


# No deadline: its largest examples build thousands of records, which a loaded machine makes take over 200 ms.
@settings(deadline=None)
@given(
    pad=st.integers(0, 100_000),
    slots=st.integers(1, 32),
    max_records=st.integers(1, 200),
    max_bytes=st.integers(1024, 1 << 20),
)
def test_claims_fill_the_window_without_holding_more_than_it_can_send(
    pad: int, slots: int, max_records: int, max_bytes: int
) -> None:
    cloud = CloudBroker(host="127.0.0.1", batch=True, batch_max_records=max_records, batch_max_bytes=max_bytes)
    batcher = Batcher(cloud, DEVICE, clock=FakeClock())
    first_id = 10**6  # every seq has 7 digits: all envelopes have one size
    envelope = len(encode_envelope(make_record(first_id, "res", {"pad": "x" * pad}), DEVICE)) + 1
    claimed = 0
    while (limit := batcher.claim_limit(slots)) > 0:
        batcher.add([make_record(first_id + claimed + i, "res", {"pad": "x" * pad}) for i in range(limit)])
        claimed += limit
    held_bytes = claimed * envelope
    # Enough for every slot, full by count or by bytes, and never more than one record beyond that (the
    # first claim, made before any size is known, is one record per slot).
    assert claimed == slots * max_records or held_bytes >= slots * max_bytes
    assert claimed <= slots * max_records
    assert held_bytes < max(slots * max_bytes + envelope, slots * envelope + 1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class BatcherMachine(RuleBasedStateMachine):
    """Any interleaving of claims, clock steps and takes: per-class FIFO, limits kept, nothing lost or
    duplicated, nothing ready left behind, fallback never held, and every payload decodes to its rows."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.batcher: Batcher
        self.next_id = 1
        self.added: dict[str, list[int]] = defaultdict(list)
        self.published: dict[str, list[int]] = defaultdict(list)
        self.settled: dict[str, list[int]] = defaultdict(list)  # published or refused as too large
        self.class_of: dict[int, str] = {}
        self.envelope_bytes: dict[int, int] = {}
        self.due: dict[int, float] = {}

    @initialize(
        max_records=st.integers(1, 6),
        max_bytes=st.integers(1024, 3000),
        linger_ms=st.sampled_from([0, 100, 5000]),
        compression=st.sampled_from(["zlib", "none"]),
    )
    def configure(self, max_records: int, max_bytes: int, linger_ms: int, compression: str) -> None:
        cloud = CloudBroker(
            host="127.0.0.1",
            batch=True,
            batch_max_records=max_records,
            batch_max_bytes=max_bytes,
            batch_linger_ms=linger_ms,
            compression=compression,
        )
        self.batcher = Batcher(cloud, DEVICE, clock=self.clock)

    @rule(
        batch=st.lists(
            st.tuples(st.sampled_from(["res", "telemetry", "fallback"]), st.integers(0, 1500), st.floats(0, 10)),
            min_size=1,
            max_size=8,
        )
    )
    def claim(self, batch: list[tuple[str, int, float]]) -> None:
        records = []
        for cls, pad, age in batch:
            records.append(make_record(self.next_id, cls, {"pad": "x" * pad}, age_s=age, ttl=30.0))
            self.envelope_bytes[self.next_id] = len(encode_envelope(records[-1], DEVICE))
            self.due[self.next_id] = self.clock.now + max(0.0, self.batcher.linger_s - age)
            self.added[cls].append(self.next_id)
            self.class_of[self.next_id] = cls
            self.next_id += 1
        self.batcher.add(records)

    @rule(seconds=st.floats(0, 6))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(slots=st.integers(1, 40), max_packet=st.none() | st.integers(300, 4000), flush=st.booleans())
    def take(self, slots: int, max_packet: int | None, flush: bool) -> None:
        batcher = self.batcher
        held_bytes: dict[str, int] = defaultdict(int)
        for row_id in self.held_ids():
            held_bytes[self.class_of[row_id]] += self.envelope_bytes[row_id] + 1
        publications, too_large = batcher.take(slots, max_packet=max_packet, flush=flush)
        assert len(publications) <= slots
        for row_id in too_large:
            self.settled[self.class_of[row_id]].append(row_id)
        for publication in publications:
            records = decode_upstream(publication.topic, publication.payload, dict(publication.properties.UserProperty))
            assert tuple(r.seq for r in records) == publication.row_ids
            cls = self.class_of[publication.row_ids[0]]
            self.settled[cls].extend(publication.row_ids)
            self.published[cls].extend(publication.row_ids)
            if max_packet:
                assert publication.estimated_packet_bytes <= max_packet
            assert publication.properties.MessageExpiryInterval <= 30
            if cls == "fallback":
                assert not publication.batch and publication.topic == f"mcp/cloud/req/{DEVICE}"
                continue
            if len(records) == 1 and self.envelope_bytes[publication.row_ids[0]] + 1 >= batcher.max_bytes:
                # As large as a whole batch: it travels alone, as a single envelope.
                assert not publication.batch and publication.topic == f"mcp/up/{DEVICE}/{cls}"
            else:
                assert publication.batch and publication.topic == f"mcp/up/{DEVICE}/{cls}/batch"
            assert len(records) <= batcher.max_records
            if not (flush or max_packet):  # a partial batch leaves only once its oldest record is due
                full = len(records) == batcher.max_records or held_bytes[cls] >= batcher.max_bytes
                assert full or self.due[publication.row_ids[0]] <= self.clock.now
            held_bytes[cls] -= sum(self.envelope_bytes[i] + 1 for i in publication.row_ids)
            if len(records) > 1:
                assert sum(self.envelope_bytes[i] + 1 for i in publication.row_ids) <= batcher.max_bytes
        if len(publications) < slots and not max_packet:
            # Everything ready was taken: what is left is young and short of a full batch.
            held = [self.class_of[i] for i in self.held_ids()]
            assert "fallback" not in held
            assert all(held.count(cls) < batcher.max_records for cls in set(held))
            if flush:
                assert batcher.buffered == 0
            due = batcher.next_due()
            assert due is None or due > self.clock.now

    def held_ids(self) -> list[int]:
        return [i for cls, ids in self.added.items() for i in ids[len(self.settled[cls]) :]]

    @invariant()
    def per_class_fifo_without_loss_or_repeats(self) -> None:
        for cls, ids in self.settled.items():
            assert sorted(ids) == self.added[cls][: len(ids)]
        for ids in self.published.values():
            assert ids == sorted(set(ids))
        assert self.batcher.buffered == len(self.held_ids())


TestBatcher = BatcherMachine.TestCase
TestBatcher.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)

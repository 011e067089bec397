"""The cloud uplink against real mosquitto brokers: outages, restarts, refusals, TLS and the subscription hook."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.compat import UTC
from agent.config import CloudBroker, OutboxSettings, TlsSettings
from agent.mqtt.localbroker import MosquittoProcess, free_port
from agent.upstream.outbox import Outbox, OutboxItem
from agent.upstream.uplink import CloudMessage, Uplink, UpstreamRecord, backoff_delay

DEVICE = "dev-1"


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached"
        time.sleep(0.02)


def cloud_settings(broker: MosquittoProcess, **overrides) -> CloudBroker:
    """One message per record (``batch = false``): this file tests single envelopes, test_uplink_batch.py
    batches."""
    values = {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.3, "batch": False}
    return CloudBroker(**(values | overrides))


class CloudObserver:
    """A plain MQTT 5 subscriber on the cloud broker with a persistent session, so nothing published while
    it is cut off (broker down) is missed once the broker is back."""

    def __init__(self, broker: MosquittoProcess, topic: str = "mcp/up/#") -> None:
        self.received: list[tuple[str, UpstreamRecord, str | None, int | None]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.3)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, clean_start=False, properties=properties)
        self.client.loop_start()
        assert self._subscribed.wait(10)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        properties = message.properties
        user = dict(getattr(properties, "UserProperty", []) or [])
        record = UpstreamRecord.model_validate_json(message.payload)
        with self._lock:
            self.received.append(
                (message.topic, record, user.get("msg-id"), getattr(properties, "MessageExpiryInterval", None))
            )

    def restart_broker(self, broker: MosquittoProcess) -> None:
        """Restart ``broker`` and return once this observer is subscribed again (it reconnects by itself).

        Its session survives the restart, but with an ``acl_file`` mosquitto (2.0.11 here) checks a session
        restored from persistence against no ACL until its client reconnects, and drops what is published to
        it before that (eclipse-mosquitto/mosquitto#384): the broker acknowledged those messages and the
        uplink rightly deleted them, yet this observer would never see them.
        """
        self._subscribed.clear()
        broker.restart()
        assert self._subscribed.wait(30), "the observer did not resubscribe after the broker restart"

    def msg_ids(self) -> set[str]:
        with self._lock:
            return {record.msg_id for _, record, _, _ in self.received}

    def first_arrivals(self) -> dict[str, list[str]]:
        """Per class, msg_ids in order of first arrival (repeats dropped, as the cloud would)."""
        order: dict[str, list[str]] = defaultdict(list)
        seen: set[str] = set()
        with self._lock:
            for _, record, _, _ in self.received:
                if record.msg_id not in seen:
                    seen.add(record.msg_id)
                    order[record.cls].append(record.msg_id)
        return order

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def observer(cloud_broker: MosquittoProcess):
    watcher = CloudObserver(cloud_broker)
    yield watcher
    watcher.close()


@pytest.fixture
def outbox(tmp_path: Path):
    store = Outbox(tmp_path / "outbox.db", OutboxSettings(ttl_s={"telemetry": 600}))
    yield store
    store.close()


def enqueue_interleaved(outbox: Outbox, per_class: int, classes=("res", "telemetry", "audit")) -> dict[str, list[str]]:
    enqueued: dict[str, list[str]] = defaultdict(list)
    count = per_class * len(classes)
    items = [OutboxItem(cls=classes[i % len(classes)], body=json.dumps({"i": i}).encode()) for i in range(count)]
    for start in range(0, len(items), 500):
        chunk = items[start : start + 500]
        for item, msg_id in zip(chunk, outbox.enqueue_many(chunk)):
            enqueued[item.cls].append(msg_id)
    return enqueued


def assert_consistent(observer: CloudObserver, enqueued: dict[str, list[str]]) -> None:
    """Every message arrived, in enqueue order per class once repeats are dropped; repeats are identical."""
    all_ids = {m for ids in enqueued.values() for m in ids}
    assert observer.msg_ids() == all_ids
    assert observer.first_arrivals() == dict(enqueued)
    bodies: dict[str, object] = {}
    for topic, record, property_id, _ in observer.received:
        assert property_id == record.msg_id
        assert topic == f"mcp/up/{DEVICE}/{record.cls}"
        assert record.device_id == DEVICE
        assert bodies.setdefault(record.msg_id, record.body) == record.body


def test_cloud_down_for_the_whole_run_then_up_delivers_everything_in_order(
    cloud_broker: MosquittoProcess, observer: CloudObserver, outbox: Outbox
) -> None:
    cloud_broker.stop()
    uplink = Uplink(outbox, cloud_settings(cloud_broker), DEVICE)
    uplink.start()
    enqueued = enqueue_interleaved(outbox, 100)
    wait_until(lambda: uplink.stats().connect_failures >= 3, what="repeated connection attempts")
    stats = outbox.stats()
    assert uplink.state in ("backoff", "disconnected")
    assert stats.messages == 300
    assert sum(c.claimed for c in stats.classes.values()) == 0  # an open circuit claims nothing
    cloud_broker.start()
    wait_until(lambda: outbox.stats().messages == 0, what="outbox drained")
    wait_until(lambda: len(observer.msg_ids()) == 300, what="all messages observed")
    assert_consistent(observer, enqueued)
    seqs = defaultdict(list)
    for _, record, _, expiry in observer.received:
        seqs[record.cls].append(record.seq)
        assert record.age_ms >= 0
        assert (expiry is not None) == (record.cls == "telemetry")
        if expiry is not None:
            assert 0 < expiry <= 600
    assert all(s == sorted(s) for s in seqs.values())
    wait_until(lambda: uplink.stats().delivered == 300)  # counted just after the outbox recorded them
    assert uplink.state == "connected"
    uplink.stop()
    assert uplink.state == "disconnected"


def test_cloud_restarts_mid_drain_lose_nothing_and_repeat_only_with_the_same_msg_id(
    cloud_broker: MosquittoProcess, observer: CloudObserver, outbox: Outbox
) -> None:
    enqueued = enqueue_interleaved(outbox, 3000, classes=("res", "telemetry"))
    uplink = Uplink(outbox, cloud_settings(cloud_broker), DEVICE)
    uplink.start()
    for restart in range(1, 4):
        wait_until(lambda target=restart * 800: uplink.stats().delivered >= target, what="drain under way")
        cloud_broker.stop()
        assert outbox.stats().messages > 0, "the drain finished before the broker went down"
        wait_until(lambda: uplink.state != "connected", what="connection loss noticed")
        cloud_broker.start()
    wait_until(lambda: outbox.stats().messages == 0, what="outbox drained")
    wait_until(lambda: len(observer.msg_ids()) == 6000, what="all messages observed")
    assert_consistent(observer, enqueued)
    assert uplink.stats().connects >= 4
    uplink.stop()


def test_refused_publishes_are_dead_lettered_then_delivered_once_allowed(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite mcp/up/{DEVICE}/res\ntopic read mcp/up/#\n")
    broker = MosquittoProcess(tmp_path / "broker", extra_config=f"acl_file {acl}\n").start()
    observer = CloudObserver(broker)
    policy = OutboxSettings(dead_letter_retry_s=0.05, dead_letter_retry_max_s=0.1, dead_letter_max_attempts=2)
    outbox = Outbox(tmp_path / "outbox.db", policy)
    uplink = Uplink(outbox, cloud_settings(broker), DEVICE)
    try:
        enqueued = enqueue_interleaved(outbox, 5, classes=("res", "audit"))
        uplink.start()
        wait_until(lambda: outbox.stats().dead_lettered.get("audit") == 10, what="two refusals per audit record")
        wait_until(lambda: observer.msg_ids() == set(enqueued["res"]), what="res delivered")
        dead = outbox.peek(state="dead")
        assert [e.msg_id for e in dead] == enqueued["audit"]
        assert {(e.last_reason, e.failures) for e in dead} == {(0x87, 2)}
        wait_until(lambda: uplink.stats().refused == 10)  # counted just after the outbox recorded them
        assert outbox.stats().classes["res"].queued == 0

        acl.write_text("topic readwrite mcp/up/#\n")
        observer.restart_broker(broker)
        assert outbox.retry_dead() == 5
        wait_until(lambda: outbox.stats().messages == 0, what="dead letters delivered")
        wait_until(lambda: observer.msg_ids() == set(enqueued["res"] + enqueued["audit"]))
        assert observer.first_arrivals()["audit"] == enqueued["audit"]
    finally:
        uplink.stop()
        outbox.close()
        observer.close()
        broker.close()


def test_message_larger_than_the_brokers_maximum_packet_is_dead_lettered_not_retried_forever(
    tmp_path: Path,
) -> None:
    broker = MosquittoProcess(tmp_path / "broker", extra_config="max_packet_size 4096\n").start()
    observer = CloudObserver(broker)
    outbox = Outbox(tmp_path / "outbox.db")
    uplink = Uplink(outbox, cloud_settings(broker), DEVICE)
    try:
        small = outbox.enqueue("res", b'{"small": true}')
        big = outbox.enqueue("res", json.dumps({"pad": "x" * 8000}).encode())
        after = outbox.enqueue("res", b'{"after": true}')
        uplink.start()
        wait_until(lambda: observer.msg_ids() == {small, after}, what="small messages delivered")
        wait_until(lambda: outbox.stats().dead == 1)
        (entry,) = outbox.peek(state="dead")
        assert (entry.msg_id, entry.last_reason) == (big, 0x95)
        assert uplink.stats().connects == 1
    finally:
        uplink.stop()
        outbox.close()
        observer.close()
        broker.close()


def test_stopping_releases_unacknowledged_rows_for_the_next_start(
    cloud_broker: MosquittoProcess, observer: CloudObserver, outbox: Outbox
) -> None:
    enqueued = enqueue_interleaved(outbox, 1000, classes=("res",))
    first = Uplink(outbox, cloud_settings(cloud_broker), DEVICE)
    first.start()
    wait_until(lambda: first.stats().delivered >= 50)
    first.stop(timeout=0)
    stats = outbox.stats()
    assert stats.classes["res"].claimed == 0
    second = Uplink(outbox, cloud_settings(cloud_broker), DEVICE)
    second.start()
    wait_until(lambda: outbox.stats().messages == 0, what="outbox drained")
    wait_until(lambda: len(observer.msg_ids()) == 1000)
    assert_consistent(observer, enqueued)
    second.stop()


def test_subscription_hook_receives_cloud_messages_and_survives_a_broker_that_forgot_us(tmp_path: Path) -> None:
    broker = MosquittoProcess(tmp_path / "broker", persistence=False).start()
    outbox = Outbox(tmp_path / "outbox.db")
    uplink = Uplink(outbox, cloud_settings(broker), DEVICE)
    received: list[CloudMessage] = []
    uplink.subscribe(f"mcp/cloud/res/{DEVICE}", received.append)
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cloud-service", protocol=mqtt.MQTTv5)
    publisher.reconnect_delay_set(0.05, 0.3)

    def publish_until_received(tag: str) -> CloudMessage:
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [("msg-id", tag)]
        properties.CorrelationData = tag.encode()

        def arrived() -> bool:
            publisher.publish(f"mcp/cloud/res/{DEVICE}", b'{"result": 1}', qos=1, properties=properties)
            return any(m.user_properties.get("msg-id") == tag for m in received)

        wait_until(arrived, what=f"cloud message {tag}")
        return next(m for m in received if m.user_properties.get("msg-id") == tag)

    try:
        uplink.start()
        publisher.connect(broker.host, broker.port)
        publisher.loop_start()
        message = publish_until_received("first")
        assert (message.topic, message.payload, message.correlation_data) == (
            f"mcp/cloud/res/{DEVICE}",
            b'{"result": 1}',
            b"first",
        )
        broker.restart()  # no persistence: the broker no longer knows our subscription
        publish_until_received("after-restart")
    finally:
        publisher.loop_stop()
        uplink.stop()
        outbox.close()
        broker.close()


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for localhost/127.0.0.1, written as PEM files."""
    now = dt.datetime.now(UTC)

    def build(subject: str, issuer_name: x509.Name, public_key, signing_key, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test cloud CA")])
    ca_cert = build("test cloud CA", ca_name, ca_key.public_key(), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = build("localhost", ca_name, server_key.public_key(), ca_key, ca=False)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def test_tls_link_delivers_and_an_unknown_ca_is_refused(tmp_path: Path) -> None:
    ca, cert, key = _certificates(tmp_path)
    (tmp_path / "other").mkdir()
    other_ca, _, _ = _certificates(tmp_path / "other")
    tls_port = free_port()
    broker = MosquittoProcess(
        tmp_path / "broker",
        extra_config=f"listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n",
    ).start()
    observer = CloudObserver(broker)
    outbox = Outbox(tmp_path / "outbox.db")
    trusted_link = cloud_settings(broker, host="localhost", port=tls_port, tls=TlsSettings(ca_file=ca))
    trusted = Uplink(outbox, trusted_link, DEVICE)
    untrusted_box = Outbox(tmp_path / "other-outbox.db")
    untrusted = Uplink(
        untrusted_box,
        cloud_settings(broker, host="localhost", port=tls_port, tls=TlsSettings(ca_file=other_ca)),
        "dev-2",
    )
    try:
        msg_id = outbox.enqueue("audit", b'{"over": "tls"}')
        untrusted_box.enqueue("audit", b"{}")
        trusted.start()
        untrusted.start()
        wait_until(lambda: observer.msg_ids() == {msg_id}, what="delivery over TLS")
        wait_until(lambda: untrusted.stats().connect_failures >= 2, what="refused TLS handshakes")
        assert "certificate verify failed" in (untrusted.stats().last_error or "")
        assert untrusted.state != "connected" and untrusted_box.stats().messages == 1
    finally:
        trusted.stop()
        untrusted.stop()
        outbox.close()
        untrusted_box.close()
        observer.close()
        broker.close()


@given(
    attempt=st.integers(0, 200),
    low=st.floats(0.01, 10),
    spread=st.floats(1, 1000),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_backoff_grows_exponentially_to_the_cap_and_never_below_half_a_step(
    attempt: int, low: float, spread: float, rand: float
) -> None:
    high = low * spread
    step = min(high, low * 2.0**attempt)
    delay = backoff_delay(attempt, low, high, rand=lambda: rand)
    assert step / 2 <= delay <= step
    assert backoff_delay(attempt + 1, low, high, rand=lambda: rand) >= delay


def _trickle_transactions(outbox: Outbox, cloud_broker: MosquittoProcess, linger_ms: float) -> int:
    uplink = Uplink(outbox, cloud_settings(cloud_broker, drain_linger_ms=linger_ms), DEVICE)
    uplink.start()
    try:
        wait_until(lambda: uplink.state == "connected", what="connected")
        before = outbox.stats().transactions
        for i in range(100):
            outbox.enqueue("res", json.dumps({"i": i}).encode())  # one commit each, as requests trickle in
            time.sleep(0.002)
        wait_until(lambda: outbox.stats().messages == 0, what="trickle delivered")
        return outbox.stats().transactions - before
    finally:
        uplink.stop()


def test_drain_linger_settles_a_trickle_of_records_in_fewer_transactions(
    cloud_broker: MosquittoProcess, tmp_path: Path
) -> None:
    # 100 enqueue commits either way; the drain's own claims and deliveries are what the linger folds.
    with Outbox(tmp_path / "eager.db") as eager, Outbox(tmp_path / "lingering.db") as lingering:
        eager_transactions = _trickle_transactions(eager, cloud_broker, linger_ms=0)
        lingering_transactions = _trickle_transactions(lingering, cloud_broker, linger_ms=50)
    assert lingering_transactions - 100 < (eager_transactions - 100) / 2


def test_drain_linger_never_holds_back_a_backlog(
    cloud_broker: MosquittoProcess, observer: CloudObserver, outbox: Outbox
) -> None:
    enqueued = enqueue_interleaved(outbox, 200)
    # 600 records through a window of 8: lingering a second per window would take 75 s.
    uplink = Uplink(outbox, cloud_settings(cloud_broker, drain_linger_ms=1000, inflight_window=8), DEVICE)
    uplink.start()
    try:
        wait_until(lambda: outbox.stats().messages == 0, timeout=30, what="backlog drained")
        wait_until(lambda: len(observer.msg_ids()) == 600, what="all messages observed")
        assert_consistent(observer, enqueued)
    finally:
        uplink.stop()

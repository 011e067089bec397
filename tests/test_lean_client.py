"""The local link's client: its own decoding of a property-less PUBLISH and a success PUBACK hands callbacks
what paho's decoder would (every other packet is paho's), and what its network thread queues for itself, it
writes on its next round, consecutive packets together."""

from __future__ import annotations

import socket
import struct
import threading
from collections import deque
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt.lean_client import LeanClient, _coalesce_head
from agent.mqtt.localbroker import MosquittoProcess
from agent.mqtt.transport import new_client
from tests.fixtures.wakeups import CountingWakeups


def _publish_packet(topic: bytes, qos: int, mid: int, properties: Properties | None, payload: bytes) -> bytearray:
    packet = struct.pack("!H", len(topic)) + topic
    if qos > 0:
        packet += struct.pack("!H", mid)
    packet += properties.pack() if properties is not None else b"\x00"
    return bytearray(packet + payload)


def _received(client: mqtt.Client, header: int, packet: bytearray) -> mqtt.MQTTMessage | Exception:
    """What the client's on_message gets for one PUBLISH (or the exception decoding raised)."""
    got: list[mqtt.MQTTMessage] = []
    client.on_message = lambda c, u, message: got.append(message)
    client._in_packet = {**client._in_packet, "command": header, "packet": bytearray(packet)}
    try:
        client._handle_publish()
    except Exception as exc:  # noqa: BLE001 (compared with what paho raises)
        return exc
    assert len(got) == 1
    return got[0]


def _fields(message: mqtt.MQTTMessage | Exception) -> Any:
    if isinstance(message, Exception):
        return type(message), str(message)
    assert isinstance(message.properties, Properties)
    return (
        message._topic, message.payload, type(message.payload), message.qos, message.dup, message.retain, message.mid,
        message.properties.json(), str(message.properties), message.properties.packetType,
    )


def _properties(response_topic: str | None, correlation: bytes | None, expiry: int | None) -> Properties | None:
    if response_topic is None and correlation is None and expiry is None:
        return None
    properties = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        properties.ResponseTopic = response_topic
    if correlation is not None:
        properties.CorrelationData = correlation
    if expiry is not None:
        properties.MessageExpiryInterval = expiry
    return properties


@settings(max_examples=300, deadline=None)
@given(
    topic=st.binary(max_size=40) | st.text(max_size=20).map(str.encode),
    qos=st.sampled_from([0, 1]),
    dup=st.booleans(),
    retain=st.booleans(),
    mid=st.integers(1, 65535),
    payload=st.binary(max_size=64),
    response_topic=st.none() | st.text(max_size=10),
    correlation=st.none() | st.binary(max_size=8),
    expiry=st.none() | st.integers(0, 2**32 - 1),
    truncate=st.none() | st.integers(0, 8),
)
def test_a_publish_reaches_on_message_as_paho_decodes_it(
    topic: bytes, qos: int, dup: bool, retain: bool, mid: int, payload: bytes, response_topic: str | None,
    correlation: bytes | None, expiry: int | None, truncate: int | None,
) -> None:  # fmt: skip
    header = 0x30 | (dup << 3) | (qos << 1) | retain
    packet = _publish_packet(topic, qos, mid, _properties(response_topic, correlation, expiry), payload)
    if truncate is not None:  # malformed: cut inside the variable header
        packet = packet[:truncate]
    paho = new_client("paho", manual_ack=True)
    lean = new_client("lean", manual_ack=True, lean=True)
    assert isinstance(lean, LeanClient)
    assert _fields(_received(lean, header, packet)) == _fields(_received(paho, header, packet))


def _acknowledged(client: mqtt.Client, packet: bytes) -> tuple[Any, ...] | None:
    """What on_publish gets for a PUBACK of a message published while offline (None: not called)."""
    got: list[tuple[Any, ...]] = []
    client.on_publish = lambda c, u, mid, reason, properties: got.append((mid, reason, properties))
    info = client.publish("t", b"x", qos=1)
    acked = bytearray(struct.pack("!H", info.mid) + packet)
    client._in_packet = {**client._in_packet, "command": 0x40, "packet": acked}
    client._handle_pubackcomp("PUBACK")
    if not got:
        return None
    mid, reason, properties = got[0]
    assert isinstance(reason, ReasonCode) and isinstance(properties, Properties)
    return (mid == info.mid, reason.value, str(reason), repr(reason), reason.is_failure, reason == 0,
            properties.json(), info._published)  # fmt: skip


@pytest.mark.parametrize("rest", [b"", b"\x00", b"\x10", b"\x80\x00", b"\x10\x04\x1f\x00\x01r"])
def test_a_puback_reaches_on_publish_as_paho_decodes_it(rest: bytes) -> None:
    paho = new_client("paho")
    lean = new_client("lean", lean=True)
    assert _acknowledged(lean, rest) == _acknowledged(paho, rest)


def _queued(command: int, qos: int, body: bytes, pos: int = 0) -> dict[str, Any]:
    return {"command": command, "mid": 1, "qos": qos, "pos": pos, "to_process": len(body) - pos, "packet": body,
            "info": None}  # fmt: skip


def test_packets_paho_keeps_no_books_on_leave_together_and_the_rest_alone() -> None:
    publish_1, puback, publish_0 = mqtt.PUBLISH | 0x02, mqtt.PUBACK, mqtt.PUBLISH
    queue = deque([_queued(publish_1, 1, b"a"), _queued(puback, 0, b"b"), _queued(publish_1, 1, b"c"),
                   _queued(publish_0, 0, b"d"), _queued(puback, 0, b"e")])  # fmt: skip
    _coalesce_head(queue)
    assert [(bytes(p["packet"]), p["to_process"], p["command"]) for p in queue] == [
        (b"abc", 3, publish_1), (b"d", 1, publish_0), (b"e", 1, puback)
    ]
    partly_sent = deque([_queued(publish_1, 1, b"xy", pos=1), _queued(puback, 0, b"z")])
    _coalesce_head(partly_sent)
    assert len(partly_sent) == 2


def test_paho_hands_a_live_connection_s_publishes_and_pubacks_to_the_lean_client(
    local_broker: MosquittoProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # paho dispatches to _handle_publish and _handle_pubackcomp; if a paho release stops calling either,
    # the local link would silently decode with paho's tables again: this fails instead.
    calls: list[str] = []
    for name in ("_handle_publish", "_handle_pubackcomp"):
        original = getattr(LeanClient, name)
        monkeypatch.setattr(
            LeanClient, name, lambda self, *args, _o=original, _n=name: (calls.append(_n), _o(self, *args))[1]
        )
    client = new_client("lean-live", lean=True)
    subscribed, received = threading.Event(), threading.Event()
    client.on_connect = lambda c, u, f, r, p: c.subscribe("lean/#", qos=1)
    client.on_subscribe = lambda *args: subscribed.set()
    replied = threading.Event()

    def on_message(c: mqtt.Client, u: Any, message: mqtt.MQTTMessage) -> None:
        if message.payload == b"hello":  # answered from the network thread, which does not wake itself
            received.set()
            c.publish("lean/reply", b"reply", qos=1)
        elif message.payload == b"reply":
            replied.set()

    client.on_message = on_message
    client.connect(local_broker.host, local_broker.port)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        info = client.publish("lean/1", b"hello", qos=1)
        info.wait_for_publish(10)
        assert info.is_published() and received.wait(10) and replied.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert "_handle_publish" in calls and "_handle_pubackcomp" in calls


def test_another_thread_sends_its_publishes_itself_and_wakes_the_network_thread_only_while_it_writes(
    local_broker: MosquittoProcess,
) -> None:
    # The outbox writer publishes replies after each commit: they leave with its own send, even while the
    # network thread is busy (here: held in a callback, as by a long read under a flood); if the network
    # thread is writing at that moment (its write lock taken), it is woken and sends them itself.
    expected = 300
    received: list[bytes] = []
    all_received, subscribed, connected = threading.Event(), threading.Event(), threading.Event()
    busy, release = threading.Event(), threading.Event()
    subscriber = new_client("lean-direct-subscriber")
    subscriber.on_connect = lambda c, u, f, r, p: c.subscribe("direct/#", qos=1)
    subscriber.on_subscribe = lambda *args: subscribed.set()

    def on_message(c: mqtt.Client, u: Any, message: mqtt.MQTTMessage) -> None:
        received.append(message.payload)
        if len(received) == expected:
            all_received.set()

    subscriber.on_message = on_message
    subscriber.connect(local_broker.host, local_broker.port)
    subscriber.loop_start()
    client = new_client("lean-direct", lean=True)
    client.on_connect = lambda c, u, f, r, p: c.subscribe("hold", qos=1)
    client.on_subscribe = lambda *args: connected.set()
    client.on_message = lambda *args: (busy.set(), release.wait(30))
    client.max_inflight_messages_set(0)  # no limit: paho never holds a publish back for the network thread
    client.connect(local_broker.host, local_broker.port)
    client.loop_start()
    try:
        assert subscribed.wait(10) and connected.wait(10)
        wakeups = CountingWakeups(client._sockpairW)
        client._sockpairW = wakeups  # type: ignore[assignment]
        subscriber.publish("hold", b"", qos=1)
        assert busy.wait(10)  # the network thread is inside a callback: it neither reads nor writes
        messages = [f"reply {index:04d}".encode() for index in range(expected)]
        for message in messages[:100]:  # one by one
            client.publish("direct/one", message, qos=1)
        with client.publishing_together():  # after a commit: many at once
            for message in messages[100:200]:
                client.publish("direct/together", message, qos=1)
        assert wakeups.sends == 0
        assert len(client._out_packet) == 0  # all sent by this thread
        release.set()
        with client._write_lock, client.publishing_together():  # as while the network thread writes
            for message in messages[200:]:
                client.publish("direct/while-writing", message, qos=1)
        assert wakeups.sends == 1
        assert all_received.wait(30), f"{len(received)} of {expected} delivered"
        assert sorted(received) == sorted(messages)
    finally:
        release.set()
        for each in (client, subscriber):
            each.disconnect()
            each.loop_stop()


def _connected_without_thread(client: mqtt.Client) -> None:
    """A client with a socket (so publishes are packed and queued) that this thread, posing as its network
    thread, never writes to: what is published stays in the queue."""
    client._sock = socket.socket()  # closed with the client
    client._thread = threading.current_thread()


@settings(max_examples=200, deadline=None)
@given(
    topic=st.text(alphabet=st.characters(blacklist_characters="+#\x00", blacklist_categories=("Cs",)), min_size=1),
    payload=st.binary(min_size=1, max_size=300) | st.binary(min_size=16_380, max_size=16_400),
    qos=st.sampled_from([0, 1, 2]),
    retain=st.booleans(),
    response_topic=st.none() | st.text(max_size=8),
    correlation=st.none() | st.binary(max_size=8),
    expiry=st.none() | st.integers(0, 2**32 - 1),
)
def test_a_publish_queues_the_packet_and_message_paho_would(
    topic: str, payload: bytes, qos: int, retain: bool, response_topic: str | None, correlation: bytes | None,
    expiry: int | None,
) -> None:  # fmt: skip
    # QoS 1 is the lean client's own publish; every QoS is its own packing.
    properties = _properties(response_topic, correlation, expiry)
    queued = []
    for client in (new_client("paho"), LeanClient(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)):
        _connected_without_thread(client)
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        message = client._out_messages.get(info.mid)  # none for QoS 0
        sent = client._out_packet.popleft()
        queued.append((
            info.rc, info.mid, bytes(sent["packet"]), sent["command"], sent["qos"], sent["mid"], sent["info"] is info,
            client._inflight_messages,
            None if message is None else (
                message._topic, message.payload, message.qos, message.retain, message.dup, message.state,
                message.properties is properties,
            ),
        ))  # fmt: skip
    assert queued[0] == queued[1]
    assert queued[0][0] == mqtt.MQTT_ERR_SUCCESS


def test_waiting_for_a_lean_publish_ends_when_the_broker_acknowledges_it() -> None:
    client = LeanClient(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    _connected_without_thread(client)
    acknowledged_before_waiting = client.publish("t", b"1", qos=1)
    waited_for = client.publish("t", b"2", qos=1)
    client._out_messages[acknowledged_before_waiting.mid].info._set_as_published()
    assert acknowledged_before_waiting.is_published()
    acknowledged_before_waiting.wait_for_publish(timeout=0.01)
    assert not waited_for.is_published()
    waiter = threading.Thread(target=waited_for.wait_for_publish, kwargs={"timeout": 30})
    waiter.start()
    client._out_messages[waited_for.mid].info._set_as_published()
    waiter.join(timeout=30)
    assert not waiter.is_alive() and waited_for.is_published()

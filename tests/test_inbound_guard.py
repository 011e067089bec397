"""The inbound guard follows MQTT framing however the bytes are cut, and refuses exactly what breaks a limit."""

from __future__ import annotations

import socket

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import PeerViolation
from agent.mqtt.inbound_guard import GuardedClient, GuardedLeanClient, InboundGuard, InboundLimits
from agent.mqtt.lean_client import LeanClient
from agent.mqtt.transport import new_guarded_client
from tests.fixtures.hostile_broker import publish_packet, remaining_length

PACKET_IDS = st.integers(1, 40)
PACKETS = st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 2), st.text(max_size=300), PACKET_IDS, st.binary(max_size=300)),
    st.tuples(st.just("pubrel"), PACKET_IDS),
    st.tuples(st.just("puback"), PACKET_IDS),
    st.tuples(st.just("pingresp")),
)


def _encode(packet: tuple) -> bytes:  # type: ignore[type-arg]
    kind = packet[0]
    if kind == "publish":
        _, qos, topic, packet_id, payload = packet
        return publish_packet(topic, payload, qos=qos, packet_id=packet_id)
    if kind == "pubrel":
        return b"\x62\x02" + packet[1].to_bytes(2, "big")
    if kind == "puback":
        return b"\x40\x02" + packet[1].to_bytes(2, "big")
    return b"\xd0\x00"


def _feed_in_pieces(guard: InboundGuard, stream: bytes, cuts: list[int]) -> None:
    bounds = [0, *sorted(cut % (len(stream) + 1) for cut in cuts), len(stream)]
    for start, end in zip(bounds, bounds[1:]):
        guard.feed(stream[start:end])


@given(st.lists(PACKETS, max_size=40), st.lists(st.integers(0, 1 << 20), max_size=30))
def test_the_unreleased_qos2_messages_are_tracked_however_the_stream_is_cut(
    packets: list[tuple], cuts: list[int]  # type: ignore[type-arg]
) -> None:
    expected: set[int] = set()
    for packet in packets:
        if packet[0] == "publish" and packet[1] == 2:
            expected.add(packet[3])
        elif packet[0] == "pubrel":
            expected.discard(packet[1])
    guard = InboundGuard(InboundLimits(max_packet_bytes=1 << 20, receive_maximum=65535))
    _feed_in_pieces(guard, b"".join(_encode(p) for p in packets), cuts)
    assert guard.awaiting_release == expected


@given(st.lists(PACKETS, max_size=60), st.lists(st.integers(0, 1 << 20), max_size=30), st.integers(1, 8))
def test_a_qos2_message_beyond_receive_maximum_is_refused(
    packets: list[tuple], cuts: list[int], receive_maximum: int  # type: ignore[type-arg]
) -> None:
    guard = InboundGuard(InboundLimits(max_packet_bytes=1 << 20, receive_maximum=receive_maximum))
    awaiting: set[int] = set()
    stream = bytearray()
    for packet in packets:
        if packet[0] == "publish" and packet[1] == 2:
            awaiting.add(packet[3])
        elif packet[0] == "pubrel":
            awaiting.discard(packet[1])
        stream += _encode(packet)
        if len(awaiting) > receive_maximum:
            with pytest.raises(PeerViolation, match="Receive Maximum"):
                _feed_in_pieces(guard, bytes(stream), cuts)
            assert len(guard.awaiting_release) == receive_maximum
            return
    _feed_in_pieces(guard, bytes(stream), cuts)


def test_a_packet_over_the_maximum_packet_size_is_refused_from_its_header_alone() -> None:
    guard = InboundGuard(InboundLimits(max_packet_bytes=4096, receive_maximum=16))
    header = b"\x32" + remaining_length(200 * 1024 * 1024)
    with pytest.raises(PeerViolation, match="Maximum Packet Size"):
        for byte in header:  # as paho reads a fixed header: one byte at a time
            guard.feed(bytes([byte]))
    assert guard.violation is not None


def test_a_packet_of_exactly_the_maximum_size_passes() -> None:
    packet = publish_packet("t", b"x" * 100, qos=1, packet_id=1)
    InboundGuard(InboundLimits(max_packet_bytes=len(packet), receive_maximum=1)).feed(packet)
    with pytest.raises(PeerViolation):
        InboundGuard(InboundLimits(max_packet_bytes=len(packet) - 1, receive_maximum=1)).feed(packet)


@pytest.mark.parametrize("qos", [1, 2])
def test_a_held_publish_with_the_packet_identifier_0_is_refused(qos: int) -> None:
    guard = InboundGuard(InboundLimits(max_packet_bytes=4096, receive_maximum=16), count_qos1=True)
    with pytest.raises(PeerViolation, match=f"QoS {qos} PUBLISH with the packet identifier 0"):
        guard.feed(publish_packet("t", b"x", qos=qos, packet_id=0))
    assert not guard.awaiting_release and not guard.awaiting_ack


def test_a_remaining_length_of_five_bytes_is_refused() -> None:
    with pytest.raises(PeerViolation, match="four bytes"):
        InboundGuard(InboundLimits(max_packet_bytes=1 << 30, receive_maximum=1)).feed(b"\x30\xff\xff\xff\xff\x01")


def test_unreleased_messages_outlive_a_reconnect_as_paho_keeps_them() -> None:
    guard = InboundGuard(InboundLimits(max_packet_bytes=4096, receive_maximum=1))
    guard.feed(publish_packet("t", b"", qos=2, packet_id=1) + b"\x30")  # a packet cut off by the disconnect
    guard.connection_started()
    with pytest.raises(PeerViolation):
        guard.feed(publish_packet("t", b"", qos=2, packet_id=2))
    guard.feed(b"\x62\x02\x00\x01" + publish_packet("t", b"", qos=2, packet_id=2))
    assert guard.awaiting_release == {2}


def test_the_guarded_client_reads_through_pahos_one_receive_call() -> None:
    # GuardedClient sees each chunk ChunkedReadClient reads with paho's private _sock_recv (paho-mqtt 2.x): a
    # paho reading some other way would silently bypass the guard.
    client = new_guarded_client("guarded", InboundLimits(max_packet_bytes=4096, receive_maximum=1))
    assert isinstance(client, GuardedClient) and client.on_socket_open is not None
    assert "_sock_recv" in vars(mqtt.Client)
    assert not client.inbound.count_qos1  # paho acknowledges each QoS 1 publish as it reads it
    broker, ours = socket.socketpair()
    ours.setblocking(False)
    client._sock, client._state = ours, mqtt._ConnectionState.MQTT_CS_CONNECTED
    try:
        broker.sendall(publish_packet("t", b"", qos=2, packet_id=1) + publish_packet("t", b"", qos=2, packet_id=2))
        assert client.loop_read() == mqtt.MQTT_ERR_CONN_LOST
        assert client.inbound.violation is not None and "Receive Maximum" in client.inbound.violation
        assert not client._in_messages  # the chunk was refused before paho read the first of its packets
    finally:
        broker.close()
        ours.close()


# A QoS 1 request (no DUP, or DUP), an acknowledgement we send, or a QoS 2 message and its release.
HELD = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 2), PACKET_IDS, st.booleans()),
    st.tuples(st.just("ack"), PACKET_IDS),
    st.tuples(st.just("pubrel"), PACKET_IDS),
)


def _counting_guard(receive_maximum: int, *, qos1_limited: bool = True) -> InboundGuard:
    limits = InboundLimits(1 << 20, receive_maximum, qos1_in_receive_maximum=qos1_limited)
    return InboundGuard(limits, count_qos1=True)


def _publish(qos: int, packet_id: int, dup: bool = False) -> bytes:
    packet = publish_packet("mcp/req/dev1/c", b"{}", qos=qos, packet_id=packet_id)
    return bytes([packet[0] | (0x08 if dup else 0)]) + packet[1:]


@given(
    st.lists(HELD, max_size=80), st.integers(1, 8), st.lists(st.integers(0, 1 << 20), max_size=6), st.booleans()
)
def test_with_manual_acknowledgements_qos1_messages_are_held_until_acknowledged(
    events: list[tuple], receive_maximum: int, cuts: list[int], qos1_limited: bool  # type: ignore[type-arg]
) -> None:
    """A model of the broker's obligations: one QoS 1 or 2 identifier held at a time until our PUBACK (QoS 1)
    or its PUBREL (QoS 2), a DUP resend of a QoS 1 message allowed, never more held than Receive Maximum (QoS 1
    messages counted only where ``qos1_in_receive_maximum``)."""
    guard = _counting_guard(receive_maximum, qos1_limited=qos1_limited)
    acked: set[int] = set()
    released: set[int] = set()
    for event in events:
        if event[0] == "ack":
            guard.acknowledged(event[1])
            acked.discard(event[1])
            continue
        if event[0] == "pubrel":
            stream, refused = b"\x62\x02" + event[1].to_bytes(2, "big"), None
            released.discard(event[1])
        else:
            _, qos, packet_id, dup = event
            stream = _publish(qos, packet_id, dup)
            mine, other = (acked, released) if qos == 1 else (released, acked)
            if packet_id in other:
                refused = "reusing"
            elif qos == 1 and packet_id in mine:
                refused = None if dup else "again before we acknowledged"
            elif packet_id in mine:
                refused = None  # a QoS 2 resend: still one message awaiting release
            elif (qos == 2 or qos1_limited) and len(released) + (len(acked) if qos1_limited else 0) == receive_maximum:
                refused = "Receive Maximum"
            else:
                refused = None
                mine.add(packet_id)
        if refused is None:
            _feed_in_pieces(guard, stream, cuts)
        else:
            with pytest.raises(PeerViolation, match=refused):
                _feed_in_pieces(guard, stream, cuts)
            assert guard.violation is not None
            guard.connection_started()  # the link reconnects: our QoS 1 acknowledgements there are void
            guard.violation = None
            acked.clear()
        assert (guard.awaiting_ack, guard.awaiting_release) == (acked, released)
        assert len(released) + (len(acked) if qos1_limited else 0) <= receive_maximum


def test_a_legit_broker_reconnecting_redelivers_what_we_had_not_acknowledged() -> None:
    guard = _counting_guard(receive_maximum=2)
    guard.feed(_publish(1, 1) + _publish(1, 2))
    guard.connection_started()  # the old connection's requests will never be acknowledged on the new one
    # The broker redelivers one (the other expired in the session) and sends a new one in the free slot.
    guard.feed(_publish(1, 2, dup=True) + _publish(1, 3))
    assert guard.awaiting_ack == {2, 3}
    guard.acknowledged(2)
    guard.feed(_publish(1, 1))
    with pytest.raises(PeerViolation, match="Receive Maximum"):
        guard.feed(_publish(1, 4))


def test_unless_qos1_counts_against_receive_maximum_only_identifiers_are_checked() -> None:
    # mosquitto 2.0.11 overshoots the window after a burst; what bounds a broker then is the identifier space.
    guard = _counting_guard(receive_maximum=2, qos1_limited=False)
    guard.feed(b"".join(_publish(1, n) for n in range(1, 6)) + _publish(2, 9) + _publish(2, 10))
    assert guard.awaiting_ack == {1, 2, 3, 4, 5} and guard.awaiting_release == {9, 10}
    with pytest.raises(PeerViolation, match="QoS 2 messages awaiting release"):
        guard.feed(_publish(2, 11))
    with pytest.raises(PeerViolation, match="identifier 3 again"):
        guard.feed(_publish(1, 3))


def test_a_qos1_message_the_guard_does_not_count_is_not_refused_for_its_identifier() -> None:
    # Without manual acknowledgements paho answers each QoS 1 publish as it reads it: an identifier may
    # come back at once, and nothing is held.
    guard = InboundGuard(InboundLimits(max_packet_bytes=4096, receive_maximum=1))
    guard.feed(_publish(1, 1) * 3 + _publish(1, 2))
    assert guard.awaiting_ack == set()


def test_the_local_links_client_is_lean_and_guarded_with_qos1_counted() -> None:
    client = new_guarded_client(
        "local", InboundLimits(max_packet_bytes=4096, receive_maximum=2), manual_ack=True, lean=True
    )
    assert isinstance(client, GuardedLeanClient) and isinstance(client, LeanClient)
    assert client.inbound.count_qos1
    # The guard's overrides run first, then the lean client's own (its decoding and writing are kept).
    mro = type(client).__mro__
    assert mro.index(GuardedClient) < mro.index(LeanClient)
    assert type(client)._handle_publish is LeanClient._handle_publish
    # Its acknowledgements release their slots through paho's one PUBACK sender (paho-mqtt 2.x): ack()
    # must still call it, or the guard would count every request forever.
    assert "_send_puback" in vars(mqtt.Client)
    client.inbound.feed(_publish(1, 7))
    client.ack(7, 1)  # not connected: paho queues it, and it would be sent on connecting
    assert client.inbound.awaiting_ack == set()

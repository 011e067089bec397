"""The ``local_packets`` fuzz target: the bytes the local broker sends, as the local link's client reads them.

:class:`~agent.mqtt.lean_client.LeanClient` decodes a property-less PUBLISH and a two-byte PUBACK itself and
writes queued packets together; paho does both for every other packet. The harness gives a lean client and a
plain paho client (its own decoder, its own reads and writes; answering a PUBREL for a message it does not
hold as every agent client does) the same stream, cut into the same pieces, over
a real socket pair, and drives each as paho's network thread does (``loop_read`` until the socket is drained,
then ``loop_write``), with the callbacks the local link uses: manual acknowledgements and replies published
from the network thread. Both must see the same thing: every callback with the same arguments (messages'
topic, payload, QoS, retain, mid, dup and properties; acknowledgements' reason and properties; the drop of the
connection for a malformed packet), the same bytes written back, the same exception if one escapes paho, and
the same state left (messages in flight both ways, the packet half read). What the lean client has not
written after its writing round, and bytes it read but has not handed to paho, must be nothing.

With the input's guard flag both read through an inbound guard, as the local link does: the lean client as
:class:`~agent.mqtt.inbound_guard.GuardedLeanClient`, paho's decoding as a
:class:`~agent.mqtt.inbound_guard.GuardedClient`, with the same limits (a Receive Maximum from the input, QoS 1
requests held to it or not). The harness acknowledges every message through paho's ``ack``, so QoS 1 packet
identifiers are held and released as on the link, and both guards must end in the same state.
"""

from __future__ import annotations

import array
import fcntl
import socket
import termios
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt.chunked import ChunkedReadClient
from agent.mqtt.inbound_guard import GuardedClient, GuardedLeanClient, InboundLimits
from agent.mqtt.lean_client import LeanClient
from tests.fuzz.fuzzed import FuzzedInput

_MAX_PREPUBLISHED = 8  # QoS 1 messages in flight before the stream starts: its PUBACKs have something to settle
_DRAIN_BYTES = 1 << 20


class _PahoReference(mqtt.Client):
    """paho's own client (its reads, its decoding, its writes) with the one change every agent client makes to
    what it sends: with ``manual_ack`` a PUBREL MQTT allows, for a message paho does not hold, is completed
    with a PUBCOMP (:class:`~agent.mqtt.chunked.ChunkedReadClient`; tests/test_qos2.py has why). Whether MQTT
    allows it is worked out here with paho's own decoding, not the agent's check."""

    def _handle_pubrel(self) -> mqtt.MQTTErrorCode:
        command, body = self._in_packet["command"], bytes(self._in_packet["packet"])
        mid = int.from_bytes(body[:2], "big")
        held = mid in self._in_messages
        rc = super()._handle_pubrel()  # raises for a body paho cannot decode
        if held or rc != mqtt.MQTT_ERR_SUCCESS or not self.is_connected():
            return rc
        if command & 0x0F != 0x02 or mid == 0:  # the flags MQTT fixes for a PUBREL; an identifier never in use
            return rc
        if len(body) > 3:  # properties: their length, minimally encoded, spans the rest of the body
            length, length_bytes = VariableByteIntegers.decode(body[3:])
            if len(VariableByteIntegers.encode(length)) != length_bytes or 3 + length_bytes + length != len(body):
                return rc
        return self._send_pubcomp(mid)


class _Run:
    """One client, its end of a socket pair set up as a connected session, and what its callbacks saw."""

    def __init__(self, client: mqtt.Client, *, reply_inline: bool, log: bool) -> None:
        self.client = client
        self.events: list[Any] = []
        self.written = bytearray()
        self.broker, ours = socket.socketpair()
        ours.setblocking(False)  # as paho's own socket: a read with nothing waiting raises BlockingIOError
        self.broker.setblocking(False)  # pieces are small and each is read before the next: never full
        # The harness is the network thread: what a callback queues waits for its loop_write, as in loop_forever.
        client._thread = threading.current_thread()
        client._sock = ours
        client._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        if log:
            client.on_log = lambda c, u, level, line: self.events.append(("log", level, line))
        self.reply_inline = reply_inline

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        properties = message.properties
        assert isinstance(properties, Properties), type(properties)
        self.events.append((
            "message", message._topic, type(message._topic), message.payload, type(message.payload), message.qos,
            message.dup, message.retain, message.mid, properties.packetType, properties.json(), str(properties),
        ))  # fmt: skip
        # The local link acknowledges a request once answered; an inline answer is published first.
        if self.reply_inline:
            client.publish("mcp/res/dev1/c", message.payload[:64], qos=1)
        client.ack(message.mid, message.qos)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties
    ) -> None:
        assert isinstance(reason, ReasonCode) and isinstance(properties, Properties), (reason, properties)
        self.events.append(("published", mid, reason.value, str(reason), reason.is_failure, properties.json()))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        self.events.append(("disconnected", reason.value, str(reason)))

    def feed(self, piece: bytes) -> None:
        """The broker sends ``piece``; the network thread reads until nothing is waiting, then writes."""
        client = self.client
        if client._sock is None:  # dropped: paho reads nothing more
            return
        self.broker.sendall(piece)
        for _ in range(len(piece) + 2):  # every loop_read takes a byte at least, or finds none waiting
            rc = client.loop_read()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self.events.append(("read", rc))
                return
            if _waiting(client) == 0:
                break
        else:
            raise AssertionError("loop_read does not drain the socket")
        rc = client.loop_write()
        self.events.append(("write", rc))
        self.drain()

    def drain(self) -> None:
        """Take what the client has written so far (PUBACKs, PUBRECs, replies)."""
        try:
            while chunk := self.broker.recv(_DRAIN_BYTES):
                self.written += chunk
        except BlockingIOError:
            pass
        except ConnectionResetError:
            pass  # the client closed its end with bytes unread (paho reads a packet at a time); written ones came first

    def state(self) -> Any:
        """Everything paho keeps between packets; with what is still queued to write appended to what was."""
        client = self.client
        pending = b"".join(bytes(packet["packet"][packet["pos"] :]) for packet in client._out_packet)
        in_packet = client._in_packet
        return (
            bytes(self.written) + pending, sorted(client._in_messages), sorted(client._out_messages),
            client._inflight_messages, client._sock is None, in_packet["command"], in_packet["remaining_length"],
            in_packet["to_process"], bytes(in_packet["packet"]), _guard_state(client),
        )  # fmt: skip

    def close(self) -> None:
        self.broker.close()
        if self.client._sock is not None:
            self.client._sock.close()


def _guard_state(client: mqtt.Client) -> Any:
    """What a guarded client's guard holds (and what it refused), or None without one."""
    if not isinstance(client, GuardedClient):
        return None
    guard = client.inbound
    return sorted(guard.awaiting_ack), sorted(guard.awaiting_release), guard.violation


def _waiting(client: mqtt.Client) -> int:
    """Bytes the client has not read: in the kernel, and (a chunk-reading client) in the chunk it read ahead."""
    sock = client._sock
    if sock is None:
        return 0
    waiting = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting, True)
    return waiting[0] + (client.buffered_bytes() if isinstance(client, ChunkedReadClient) else 0)


def _outcome(run: _Run, stream: bytes, piece: int, prepublished: int) -> Any:
    """Drive one client over the stream; its events and state, or the exception that escaped it."""
    try:
        for mid in range(prepublished):
            run.client.publish(f"mcp/res/dev1/p{mid}", b"x", qos=1)
        run.client.loop_write()
        run.drain()
        for start in range(0, len(stream), piece):
            run.feed(stream[start : start + piece])
    except Exception as exc:  # noqa: BLE001 (compared with what paho raises for the same bytes)
        return ("raised", type(exc), str(exc), run.events)
    return run.events, run.state()


def target_local_packets(data_bytes: bytes) -> None:
    """The local broker's bytes, in pieces of any size: the lean client sees and writes exactly what paho does,
    and leaves nothing unwritten or unread behind."""
    data = FuzzedInput(data_bytes)
    prepublished = data.byte() % (_MAX_PREPUBLISHED + 1)
    flags = data.byte()
    piece = data.byte()
    stream = data.rest()
    piece = piece or len(stream) or 1  # 0: the whole stream at once
    options = {"reply_inline": bool(flags & 1), "log": bool(flags & 2)}
    version = mqtt.CallbackAPIVersion.VERSION2
    if flags & 4:  # guarded: Receive Maximum 1-16 from the high bits, QoS 1 held to it with bit 3
        limits = InboundLimits(1 << 20, 1 + (flags >> 4), qos1_in_receive_maximum=bool(flags & 8))
        lean_client: mqtt.Client = GuardedLeanClient(
            version, limits=limits, client_id="lean", protocol=mqtt.MQTTv5, manual_ack=True
        )
        paho_client: mqtt.Client = GuardedClient(
            version, limits=limits, client_id="paho", protocol=mqtt.MQTTv5, manual_ack=True
        )
    else:
        lean_client = LeanClient(version, client_id="lean", protocol=mqtt.MQTTv5, manual_ack=True)
        paho_client = _PahoReference(version, client_id="paho", protocol=mqtt.MQTTv5, manual_ack=True)
    lean, paho = _Run(lean_client, **options), _Run(paho_client, **options)
    try:
        expected = _outcome(paho, stream, piece, prepublished)
        got = _outcome(lean, stream, piece, prepublished)
        assert got == expected, (got, expected)
        if lean.client._sock is not None:
            assert not lean.client._out_packet, "queued but not written on the writing round"
            assert lean.client.buffered_bytes() == 0, "read ahead but not handed to paho"
    finally:
        lean.close()
        paho.close()

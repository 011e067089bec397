"""The local link's paho client: the per-request work paho does that a request link does not need, left out.

Decoding. paho 2.x's ``Properties.__init__`` builds three lookup tables per instance, its ``unpack`` then
walks 27 property names to clear attributes a new instance cannot have, and ``ReasonCode.__init__`` copies a
table of its own: decoding one request's PUBLISH and its reply's PUBACK cost ~26 us of Python, a tenth of
the agent's CPU per reply on the bare path. Here the tables are built once per class, and the two common
shapes are decoded directly: a PUBLISH without properties and a two-byte PUBACK (success, no properties;
what brokers send). Callbacks get the same objects paho makes (a ``Properties`` and a ``ReasonCode``,
subclasses with shared tables); any other packet, and any other protocol version, goes through paho.

Writing. paho wakes its network thread with a byte on a socket pair for every packet queued, even by the
network thread itself (a reply served inline, its request's PUBACK), which then reads the byte back: two
system calls per packet for a thread that is awake anyway and writes whatever is queued on its next round.
And it sends each queued packet with a ``send`` of its own. Here the network thread queues without waking
itself, and consecutive queued packets whose sending needs no bookkeeping (QoS 1 and 2 PUBLISHes, PUBACKs)
leave in one ``send``. A QoS 1 PUBLISH (every reply) is built in one ``join`` instead of paho's byte-by-byte
packing and logging calls, and its ``MQTTMessageInfo`` makes the ``Condition`` a waiter needs only when
someone waits (nobody waits on a reply's): about half of paho's ~5 us per publish. Any other QoS, protocol
version or payload type goes through paho.

Another thread (the outbox writer after a commit, a worker) does not wake the network thread either: it
sends what is queued itself, with the one system call the wake-up byte would have cost. Under a flood the
network thread spends tens of milliseconds at a time reading and admitting requests (and serving some
inline) before it writes again; a reply waiting for it waited that long, whoever it answered (measured:
p99 of 100-230 ms from publishing a paced client's reply to its write, beside a 2,000 requests/s flood).
Sending is serialized with the network thread's writes by a lock; only packets that need no bookkeeping
are sent this way, and whatever the kernel does not take at once (or a TLS socket, whose state a second
thread must not touch) is left to the network thread, woken as before.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt.chunked import ChunkedReadClient

_TABLES = Properties(PacketTypes.PUBLISH)
_UINT16 = struct.Struct("!H")
_NO_PROPERTIES = b"\x00"
_MAX_PAYLOAD_BYTES = 268_435_455  # paho's limit (the largest MQTT remaining length)
# Guards creating a LeanMessageInfo's condition against the network thread marking it published.
_CONDITIONS_LOCK = threading.Lock()
# A coalesced write stops growing past this (a larger one would only be split by the kernel).
_COALESCE_MAX_BYTES = 65_536


def _needs_no_bookkeeping(packet: Any) -> bool:
    """Whether paho does nothing once this queued packet is written (it does for QoS 0 and DISCONNECT)."""
    kind = packet["command"] & 0xF0
    return packet["pos"] == 0 and ((kind == mqtt.PUBLISH and packet["qos"] > 0) or kind == mqtt.PUBACK)


def _coalesce_head(out: deque[Any]) -> None:
    """Merge the packets at the head of paho's queue that need no bookkeeping into one, to send at once.

    Runs on the network thread, the queue's only consumer; other threads only append at its tail.
    """
    if len(out) < 2 or not _needs_no_bookkeeping(out[0]) or not _needs_no_bookkeeping(out[1]):
        return
    first = out.popleft()
    merged = bytearray(first["packet"])
    while out and len(merged) < _COALESCE_MAX_BYTES and _needs_no_bookkeeping(out[0]):
        merged += out.popleft()["packet"]
    out.appendleft({**first, "packet": merged, "to_process": len(merged)})


class LeanProperties(Properties):
    """paho's ``Properties`` whose name and type tables are shared class attributes (they never change)."""

    types = _TABLES.types
    names = _TABLES.names
    properties = _TABLES.properties

    def __init__(self, packetType: int) -> None:  # noqa: N803 (paho's name)
        object.__setattr__(self, "packetType", packetType)


class LeanReasonCode(ReasonCode):
    """paho's ``ReasonCode`` reading the class's (read-only) table instead of a copy per instance."""

    def __init__(self, packetType: int, identifier: int) -> None:  # noqa: N803 (paho's name)
        self.packetType = packetType
        self.value = identifier


class LeanMessageInfo(mqtt.MQTTMessageInfo):
    """paho's ``MQTTMessageInfo`` whose ``Condition`` is created by the first waiter, not for every message."""

    __slots__ = ()

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self._published = False
        self._condition = None  # type: ignore[assignment]  # made by _ensure_condition, for a waiter
        self.rc = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        self._iterpos = 0

    def _ensure_condition(self) -> None:
        with _CONDITIONS_LOCK:
            if self._condition is None:
                self._condition = threading.Condition()

    def _set_as_published(self) -> None:
        with _CONDITIONS_LOCK:
            if self._condition is None:  # nobody waits (a later waiter sees _published under the condition)
                self._published = True
                return
        super()._set_as_published()

    def wait_for_publish(self, timeout: float | None = None) -> None:
        self._ensure_condition()
        super().wait_for_publish(timeout)

    def is_published(self) -> bool:
        self._ensure_condition()
        return super().is_published()


class LeanMessage(mqtt.MQTTMessage):
    """paho's ``MQTTMessage`` carrying a :class:`LeanMessageInfo`."""

    __slots__ = ()

    def __init__(self, mid: int = 0, topic: bytes = b"") -> None:
        self.timestamp = 0.0
        self.state = mqtt.mqtt_ms_invalid
        self.dup = False
        self.mid = mid
        self._topic = topic
        self.payload = b""
        self.qos = 0
        self.retain = False
        self.info = LeanMessageInfo(mid)
        self.properties = None


def _remaining_length(length: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length (7 bits a byte, low first)."""
    if length > _MAX_PAYLOAD_BYTES:
        raise ValueError("Packet too large")  # as paho's packing raises it
    if length < 128:
        return bytes((length,))
    encoded = bytearray()
    while True:
        length, byte = divmod(length, 128)
        encoded.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(encoded)


class LeanClient(ChunkedReadClient):
    """A :class:`ChunkedReadClient` that decodes the common PUBLISH and PUBACK itself, does not wake its own
    network thread, and writes consecutive packets together.

    paho's two handlers fall back to paho's for anything but those shapes; tests/test_lean_client.py fails
    if paho stops calling them, decodes differently, or stops writing what is queued on its next round.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Held while packets leave the queue for the socket: by the network thread, or by another thread
        # sending what it queued (see the module's docstring).
        self._write_lock = threading.Lock()

    def publish(
        self, topic: str, payload: mqtt.PayloadType = None, qos: int = 0, retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:  # fmt: skip
        """paho's ``publish``; a QoS 1 one with a bytes payload (MQTT 5) is built here, as paho would build it."""
        if qos != 1 or self._protocol != mqtt.MQTTv5 or not isinstance(payload, (bytes, bytearray)):
            return super().publish(topic, payload, qos, retain, properties)
        topic_bytes = topic.encode("utf-8")
        self._raise_for_invalid_topic(topic_bytes)
        if len(payload) > _MAX_PAYLOAD_BYTES:
            raise ValueError("Payload too large.")
        message = LeanMessage(self._mid_generate(), topic_bytes)
        message.timestamp = mqtt.time_func()
        message.payload = payload
        message.qos = 1
        message.retain = retain
        message.properties = properties
        info = message.info
        # From here on paho's publish, for QoS 1.
        with self._out_message_mutex:
            if (
                self._max_queued_messages > 0 and len(self._out_messages) >= self._max_queued_messages
            ) or message.mid in self._out_messages:
                info.rc = mqtt.MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
                return info
            self._out_messages[message.mid] = message
            if self._max_inflight_messages == 0 or self._inflight_messages < self._max_inflight_messages:
                self._inflight_messages += 1
                message.state = mqtt.mqtt_ms_wait_for_puback
                rc = self._send_publish(message.mid, topic_bytes, payload, 1, retain, False, info, properties)
                if rc == mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN:  # sent once connected
                    self._inflight_messages -= 1
                    message.state = mqtt.mqtt_ms_publish
                info.rc = rc
                return info
            message.state = mqtt.mqtt_ms_queued
            info.rc = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            return info

    def _send_publish(
        self, mid: int, topic: bytes, payload: bytes | bytearray = b"", qos: int = 0, retain: bool = False,
        dup: bool = False, info: mqtt.MQTTMessageInfo | None = None, properties: Properties | None = None,
    ) -> mqtt.MQTTErrorCode:  # fmt: skip
        # paho's packing (MQTT 5, a non-empty bytes payload), in one join; anything else is paho's.
        if (
            self._protocol != mqtt.MQTTv5 or not payload or not isinstance(topic, bytes)
            or not isinstance(payload, (bytes, bytearray)) or self._sock is None
        ):  # fmt: skip
            return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)
        if self.on_log is not None or self._logger is not None:  # paho formats its debug line only for these
            self._easy_log(
                mqtt.MQTT_LOG_DEBUG, "Sending PUBLISH (d%d, q%d, r%d, m%d), '%s', properties=%s, ... (%d bytes)",
                dup, qos, retain, mid, topic, properties, len(payload),
            )  # fmt: skip
        packed_properties = _NO_PROPERTIES if properties is None else properties.pack()
        packet_id = _UINT16.pack(mid) if qos > 0 else b""
        remaining = 2 + len(topic) + len(packet_id) + len(packed_properties) + len(payload)
        command = mqtt.PUBLISH | ((dup & 0x1) << 3) | (qos << 1) | retain
        packet = b"".join(
            (bytes((command,)), _remaining_length(remaining), _UINT16.pack(len(topic)), topic, packet_id,
             packed_properties, payload)
        )  # fmt: skip
        return self._packet_queue(mqtt.PUBLISH, packet, mid, qos, info)

    def _packet_queue(
        self, command: int, packet: bytes | bytearray, mid: int, qos: int, info: mqtt.MQTTMessageInfo | None = None
    ) -> mqtt.MQTTErrorCode:
        if self._thread is None:  # no network thread (connecting, or stopped): paho's own
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append(
            {"command": command, "mid": mid, "qos": qos, "pos": 0, "to_process": len(packet), "packet": packet,
             "info": info}
        )  # fmt: skip
        # The network thread itself writes what is queued before it next waits (want_write). Another thread
        # sends it now, or at the end of its publishing_together block.
        if self._thread is not threading.current_thread():
            if getattr(self._wakeups, "held", False):
                self._wakeups.pending = True
            else:
                self._wake_network_thread()
        self._call_socket_register_write()
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_write(self) -> mqtt.MQTTErrorCode:
        with self._write_lock:
            _coalesce_head(self._out_packet)
            return super()._packet_write()

    def _wake_network_thread(self) -> None:
        if not self._send_queued():
            super()._wake_network_thread()

    def _send_queued(self) -> bool:
        """Send what is queued from this thread (not the network thread); False when something is left for the
        network thread: a packet that needs paho's bookkeeping, more than the kernel takes now, a TLS socket,
        or the network thread writing at this moment (it then takes these packets too, or is woken for them)."""
        sock = self._sock
        if sock is None or hasattr(sock, "pending") or not self._write_lock.acquire(blocking=False):
            return False
        sent_any = False
        try:
            out = self._out_packet
            while out:
                _coalesce_head(out)  # other threads only append at the tail; the lock keeps the network thread out
                packet = out[0]
                if not _needs_no_bookkeeping(packet):
                    return False
                data = packet["packet"]
                try:
                    sent = sock.send(data)
                except OSError:  # the kernel's buffer is full (BlockingIOError), or the connection broke
                    return False
                sent_any = True
                if sent < len(data):  # paho's own write continues from "pos"
                    packet["pos"], packet["to_process"] = sent, len(data) - sent
                    return False
                out.popleft()
            return True
        finally:
            if sent_any:
                with self._msgtime_mutex:  # what paho's keepalive reads: the connection is in use
                    self._last_msg_out = mqtt.time_func()
            self._write_lock.release()

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        packet = self._in_packet["packet"]
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        # QoS 2 keeps paho's bookkeeping; QoS 3 is paho's protocol error (the connection is dropped).
        if self._protocol != mqtt.MQTTv5 or qos > 1:
            return super()._handle_publish()
        # The variable header: topic (length-prefixed), packet id (QoS > 0), property length, properties.
        try:
            (topic_length,) = _UINT16.unpack_from(packet, 0)
            at = 2 + topic_length
            mid = _UINT16.unpack_from(packet, at)[0] if qos > 0 else 0
            at += 2 if qos > 0 else 0
            has_properties = packet[at] != 0
        except (struct.error, IndexError):
            return super()._handle_publish()  # malformed: paho raises what it raises
        if has_properties:
            return super()._handle_publish()
        topic = bytes(packet[2 : 2 + topic_length])
        message = LeanMessage(mid=mid, topic=topic)
        message.dup = (header & 0x08) != 0
        message.qos = qos
        message.retain = (header & 0x01) != 0
        message.properties = LeanProperties(PacketTypes.PUBLISH)
        message.payload = bytes(packet[at + 1 :])
        if self.on_log is not None or self._logger is not None:  # paho formats its debug line only for these
            self._easy_log(
                mqtt.MQTT_LOG_DEBUG, "Received PUBLISH (d%d, q%d, r%d, m%d), '%s', properties=%s, ...  (%d bytes)",
                message.dup, message.qos, message.retain, message.mid, _printable(topic),
                message.properties, len(message.payload),
            )  # fmt: skip
        message.timestamp = mqtt.time_func()
        self._handle_on_message(message)
        if qos == 0 or self._manual_ack:
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(message.mid)

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> mqtt.MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol != mqtt.MQTTv5 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        (mid,) = _UINT16.unpack(packet)
        self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received %s (Mid: %d)", cmd, mid)
        with self._out_message_mutex:
            if mid in self._out_messages:
                success = LeanReasonCode(PacketTypes.PUBACK, 0)
                return self._do_on_publish(mid, success, LeanProperties(PacketTypes.PUBACK))
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS


def _printable(topic: bytes) -> str:
    """A topic for a log line, as paho prints it (one that is not UTF-8 shown as its bytes)."""
    try:
        return topic.decode("utf-8")
    except UnicodeDecodeError:
        return f"TOPIC WITH INVALID UTF-8: {topic!r}"

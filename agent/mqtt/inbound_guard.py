"""What an MQTT peer may make this client hold, checked on the bytes as they arrive from the socket.

paho reads every packet whole before anyone can look at it: a PUBLISH announcing 200 MB is read into memory
(appended chunk by chunk), and a QoS 2 PUBLISH is kept until its PUBREL, however many arrive. A broker that
honours our CONNECT's Maximum Packet Size and Receive Maximum never comes near either limit; one that ignores
them is cut off here, before paho allocates anything for the packet that breaks them.

:class:`InboundGuard` follows the packet framing of the stream (fixed header, remaining length, and of the
packets that matter the packet identifier) and raises :class:`~agent.errors.PeerViolation` — an ``OSError``,
which paho treats as a lost connection — as soon as a packet is announced larger than the limit, or a QoS 2
PUBLISH would leave more than Receive Maximum of them awaiting their PUBREL. QoS 1 publishes are not counted:
without ``manual_ack`` paho acknowledges each one as it is read and keeps nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt

from agent.errors import PeerViolation
from agent.mqtt.chunked import ChunkedReadClient

_PUBLISH, _PUBREL = 3, 6


@dataclass(frozen=True)
class InboundLimits:
    """What we announced in CONNECT and hold the peer to."""

    max_packet_bytes: int
    receive_maximum: int


class InboundGuard:
    """The framing state of one byte stream from the peer, and the QoS 2 messages it left unreleased.

    The unreleased packet identifiers outlive a connection, as paho's copies of those messages do in a
    persistent session: a broker cannot reset the count by reconnecting. Only a CONNACK without a session
    clears them, together with paho's copies (:meth:`GuardedClient._session_absent`).
    """

    def __init__(self, limits: InboundLimits) -> None:
        self.limits = limits
        self.awaiting_release: set[int] = set()
        self.violation: str | None = None
        self.connection_started()

    def connection_started(self) -> None:
        """A new stream begins (a new socket): the next byte is a packet's first."""
        self._stage: Literal["type", "length", "body"] = "type"
        self._type = self._flags = 0
        self._length = self._length_bytes = 0
        self._left = 0
        self._head = bytearray()  # the first bytes of the body, as far as they lead to the packet identifier
        self._head_need = 0

    def feed(self, data: bytes) -> None:
        """Account for ``data`` as read from the socket; raises :class:`PeerViolation` when a limit breaks."""
        view = memoryview(data)
        position = 0
        while position < len(view):
            if self._stage == "body":
                position = self._consume_body(view, position)
            elif self._stage == "type":
                self._type, self._flags = view[position] >> 4, view[position] & 0x0F
                self._length = self._length_bytes = 0
                self._stage = "length"
                position += 1
            else:
                self._read_length_byte(view[position])
                position += 1

    def _read_length_byte(self, byte: int) -> None:
        self._length += (byte & 0x7F) << (7 * self._length_bytes)
        self._length_bytes += 1
        if byte & 0x80:
            if self._length_bytes >= 4:
                self._refuse("a remaining length longer than four bytes")
            return
        size = 1 + self._length_bytes + self._length
        if size > self.limits.max_packet_bytes:
            self._refuse(f"a {size}-byte packet, over the Maximum Packet Size {self.limits.max_packet_bytes}")
        self._stage, self._left = "body", self._length
        self._head.clear()
        qos = (self._flags >> 1) & 0x03
        self._head_need = 2 if self._type == _PUBREL or (self._type == _PUBLISH and qos == 2) else 0
        if self._left == 0:
            self._packet_done()

    def _consume_body(self, view: memoryview, position: int) -> int:
        take = min(self._left, len(view) - position)
        missing = self._head_need - len(self._head)
        if missing > 0:
            take = min(take, missing)  # the head is read piece by piece: its need grows once the topic length is in
            self._head += view[position : position + take]
            if self._type == _PUBLISH and self._head_need == 2 and len(self._head) == 2:
                # Topic length, topic, then the packet identifier.
                self._head_need = 2 + int.from_bytes(self._head[:2], "big") + 2
        self._left -= take
        if self._left == 0:
            self._packet_done()
        return position + take

    def _packet_done(self) -> None:
        self._stage = "type"
        if self._type == _PUBREL and len(self._head) >= 2:
            self.awaiting_release.discard(int.from_bytes(self._head[:2], "big"))
        elif self._type == _PUBLISH and self._head_need >= 4 and len(self._head) == self._head_need:
            packet_id = int.from_bytes(self._head[self._head_need - 2 : self._head_need], "big")
            self.awaiting_release.add(packet_id)
            if len(self.awaiting_release) > self.limits.receive_maximum:
                self.awaiting_release.discard(packet_id)  # refused before paho ever kept it
                self._refuse(
                    f"more than {self.limits.receive_maximum} QoS 2 messages awaiting release (its Receive Maximum)"
                )

    def _refuse(self, what: str) -> None:
        self.violation = f"the peer sent {what}"
        raise PeerViolation(self.violation)


class GuardedClient(ChunkedReadClient):
    """A chunk-reading paho client whose every read passes through an :class:`InboundGuard` before paho sees it."""

    def __init__(self, *args: Any, limits: InboundLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inbound = InboundGuard(limits)

    def reconnect(self) -> mqtt.MQTTErrorCode:
        """paho's reconnect, on a fresh stream."""
        self.inbound.connection_started()
        self.inbound.violation = None
        return super().reconnect()

    def _session_absent(self) -> None:
        # The broker will reuse those ids for new messages; counting them still would refuse a broker that
        # restarted without persistence, once Receive Maximum of them were left.
        super()._session_absent()
        self.inbound.awaiting_release.clear()

    def _sock_recv(self, bufsize: int) -> bytes:
        # paho's one read (paho-mqtt 2.x; tests/test_inbound_guard.py pins it), served from the chunk read from
        # the socket: plain TCP and TLS alike. An OSError raised here is handled by paho as a lost connection.
        data = super()._sock_recv(bufsize)
        self.inbound.feed(data)
        return data

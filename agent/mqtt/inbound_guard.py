"""What an MQTT peer may make this client hold, checked on the bytes as they arrive from the socket.

paho reads every packet whole before anyone can look at it: a PUBLISH announcing 200 MB is read into memory
(appended chunk by chunk), and a QoS 2 PUBLISH is kept until its PUBREL, however many arrive. A broker that
honours our CONNECT's Maximum Packet Size and Receive Maximum never comes near either limit; one that ignores
them is cut off here, before paho allocates anything for the packet that breaks them.

:class:`InboundGuard` follows the packet framing of the stream (fixed header, remaining length, and of the
packets that matter the packet identifier) and raises :class:`~agent.errors.PeerViolation` — an ``OSError``,
which paho treats as a lost connection — as soon as a packet is announced larger than the limit, a PUBLISH
would leave more than Receive Maximum messages awaiting our acknowledgement, or one reuses a packet identifier
still awaiting it or has the identifier 0.

What awaits it depends on who acknowledges. A QoS 2 PUBLISH awaits its PUBREL (paho keeps it until then). A
QoS 1 PUBLISH is held only by a client that acknowledges by hand (``manual_ack``: the local link answers a
request before its PUBACK goes out): its guard tracks QoS 1 packet identifiers too, each released the moment
our PUBACK is queued, and refuses one reused while still unacknowledged unless it is flagged DUP (which also
bounds what a broker can make us hold: 65,535 identifiers). Whether held QoS 1 messages also count against
Receive Maximum is :attr:`InboundLimits.qos1_in_receive_maximum`: mosquitto 2.0.11 moves every queued message
into flight on any PUBACK, so a burst larger than the window exceeds it from a broker that means no harm.
Without ``manual_ack`` paho acknowledges each QoS 1 publish as it is read and keeps nothing, so none is tracked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt

from agent.errors import PeerViolation
from agent.mqtt.chunked import ChunkedReadClient
from agent.mqtt.lean_client import LeanClient

_PUBLISH, _PUBREL = 3, 6


@dataclass(frozen=True)
class InboundLimits:
    """What we announced in CONNECT and hold the peer to.

    ``qos1_in_receive_maximum``: unacknowledged QoS 1 messages (tracked with ``manual_ack`` only) count against
    ``receive_maximum`` beside the unreleased QoS 2 ones, as MQTT 5 says they should.
    """

    max_packet_bytes: int
    receive_maximum: int
    qos1_in_receive_maximum: bool = False


class InboundGuard:
    """The framing state of one byte stream from the peer, and the messages it left awaiting our acknowledgement.

    ``count_qos1``: QoS 1 publishes are held until :meth:`acknowledged` (a client with ``manual_ack``). The
    unreleased QoS 2 identifiers outlive a connection, as paho's copies of those messages do in a persistent
    session: a broker cannot reset that count by reconnecting. Only a CONNACK without a session clears them,
    together with paho's copies (:meth:`GuardedClient._session_absent`). The unacknowledged QoS 1 identifiers
    do not outlive a connection: a manual acknowledgement is only valid on the connection its PUBLISH came on
    (the local link drops older ones, see its ``generation``), and the broker redelivers those messages,
    flagged DUP, on the next one, where they are held afresh (a broker that lost them meanwhile must not leave
    their slots taken for good).

    :meth:`feed` runs on the network thread and :meth:`acknowledged` on whichever thread acknowledges; each
    touches the sets with single operations the GIL keeps whole, and a concurrent release can only lower the
    count a check sees.
    """

    def __init__(self, limits: InboundLimits, *, count_qos1: bool = False) -> None:
        self.limits = limits
        self.count_qos1 = count_qos1
        self.awaiting_release: set[int] = set()
        self.awaiting_ack: set[int] = set()
        self.violation: str | None = None
        self.connection_started()

    def acknowledged(self, packet_id: int) -> None:
        """Our PUBACK for ``packet_id`` is about to be queued: the broker may use its slot once it has it."""
        self.awaiting_ack.discard(packet_id)

    def connection_started(self) -> None:
        """A new stream begins (a new socket): the next byte is a packet's first, and no QoS 1 message of an
        older connection will be acknowledged any more."""
        self.awaiting_ack.clear()
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
        held = qos == 2 or (qos == 1 and self.count_qos1)
        self._head_need = 2 if self._type == _PUBREL or (self._type == _PUBLISH and held) else 0
        if self._left == 0:
            self._packet_done()

    def _consume_body(self, view: memoryview, position: int) -> int:
        if self._head_need and not self._head and len(view) - position >= self._left:
            return self._consume_whole_body(view, position)
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

    def _consume_whole_body(self, view: memoryview, position: int) -> int:
        """A body whose head matters, all in ``view`` (how paho reads a body: with one call): the head at once."""
        end = position + self._left
        if self._type == _PUBLISH and self._left >= 2:
            # Topic length, topic, then the packet identifier.
            self._head_need = 4 + int.from_bytes(view[position : position + 2], "big")
        self._head += view[position : min(end, position + self._head_need)]
        self._left = 0
        self._packet_done()
        return end

    def _packet_done(self) -> None:
        self._stage = "type"
        if self._type == _PUBREL and len(self._head) >= 2:
            self.awaiting_release.discard(int.from_bytes(self._head[:2], "big"))
        elif self._type == _PUBLISH and self._head_need >= 4 and len(self._head) == self._head_need:
            packet_id = int.from_bytes(self._head[self._head_need - 2 : self._head_need], "big")
            if packet_id == 0:  # MQTT forbids it for QoS > 0: it could not be acknowledged (paho would PUBREC 0)
                self._refuse(f"a QoS {(self._flags >> 1) & 0x03} PUBLISH with the packet identifier 0")
            # The identifiers of QoS 1 and QoS 2 messages are one space: one held for either is not free for the other.
            if (self._flags >> 1) & 0x03 == 2:
                if packet_id in self.awaiting_ack:
                    self._refuse(f"a QoS 2 message reusing the packet identifier {packet_id} before we acknowledged it")
                self._held(self.awaiting_release, packet_id, "QoS 2 messages awaiting release")
            elif packet_id in self.awaiting_release:
                self._refuse(f"a QoS 1 message reusing the packet identifier {packet_id} of one awaiting release")
            elif packet_id not in self.awaiting_ack:
                if self.limits.qos1_in_receive_maximum:
                    self._held(self.awaiting_ack, packet_id, "messages awaiting acknowledgement")
                else:
                    self.awaiting_ack.add(packet_id)
            elif not self._flags & 0x08:  # not DUP: a new message in the slot of one we have not acknowledged
                self._refuse(f"the packet identifier {packet_id} again before we acknowledged it")

    def _held(self, awaiting: set[int], packet_id: int, what: str) -> None:
        """Count ``packet_id`` as held, unless that makes more than Receive Maximum messages held."""
        awaiting.add(packet_id)
        held = len(self.awaiting_release) + (len(self.awaiting_ack) if self.limits.qos1_in_receive_maximum else 0)
        if held > self.limits.receive_maximum:
            awaiting.discard(packet_id)  # refused before paho ever kept it
            self._refuse(f"more than {self.limits.receive_maximum} {what} (its Receive Maximum)")

    def _refuse(self, what: str) -> None:
        self.violation = f"the peer sent {what}"
        raise PeerViolation(self.violation)


class GuardedClient(ChunkedReadClient):
    """A chunk-reading paho client whose every read passes through an :class:`InboundGuard` before paho sees it.

    With ``manual_ack`` its guard holds QoS 1 publishes until their PUBACK. The overrides here are the whole
    of the guarding; :class:`GuardedLeanClient` puts them in front of the lean client's.
    """

    def __init__(self, *args: Any, limits: InboundLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inbound = InboundGuard(limits, count_qos1=self._manual_ack)

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

    def _socket_read(self, size: int) -> bytes:
        # Each chunk as read from the socket (paho's one read, paho-mqtt 2.x; tests/test_inbound_guard.py pins
        # it), plain TCP and TLS alike: once per chunk, not per paho read (three or more per packet). The guard is
        # then ahead of paho, never behind it: a packet it refuses never reaches paho, nor do the ones after it
        # in the chunk. An OSError raised here is handled by paho as a lost connection.
        data = super()._socket_read(size)
        self.inbound.feed(data)
        return data

    def _send_puback(self, mid: int) -> mqtt.MQTTErrorCode:
        # paho's one way out for a PUBACK (2.x: ack() and its automatic acknowledgement alike; pinned in
        # tests/test_inbound_guard.py). Released first: once queued, the PUBACK may reach the broker and its
        # next publish reach the guard before this thread runs again.
        self.inbound.acknowledged(mid)
        return super()._send_puback(mid)


class GuardedLeanClient(GuardedClient, LeanClient):
    """The local link's client: :class:`~agent.mqtt.lean_client.LeanClient`'s decoding and writing, reading
    through an :class:`InboundGuard` (the reads and acknowledgements go through :class:`GuardedClient` first)."""

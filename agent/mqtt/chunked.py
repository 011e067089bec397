"""paho reading its socket a chunk at a time (and publishing many messages with one wake-up of its network
thread, and keeping its received QoS 2 state right across connections): the base of every MQTT client the
agent makes."""

from __future__ import annotations

import array
import contextlib
import fcntl
import termios
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt

_READ_CHUNK_BYTES = 65_536


class ChunkedReadClient(mqtt.Client):
    """A paho client that reads its socket a chunk at a time instead of a few bytes per call.

    paho reads every packet with at least three ``recv`` calls (its type, its length, its body), and each
    releases the GIL; while other threads run Python, taking it back waits up to the interpreter's switch
    interval, so under load the network thread read a packet every few milliseconds and requests waited at
    the broker, in its arrival order, where no fairness applies. One ``recv`` per chunk hands paho every
    packet that had arrived. Only ``_sock_recv`` (paho's one read primitive, unchanged since 1.x) and the
    public ``loop_read`` are overridden; tests/test_transport.py fails if paho stops calling either.

    It also lets a thread publish many messages with one wake-up of the network thread
    (:meth:`publishing_together`, through ``_packet_queue``, paho's one queueing primitive for outgoing
    packets; tests/test_transport.py fails if paho stops calling it or stops reading its socket pair).

    And it mends paho's received QoS 2 state across connections (tests/test_qos2.py, with a real broker):
    a CONNACK without a session drops the messages awaiting their PUBREL, which paho keeps whenever the
    client asked for a session; and with ``manual_ack`` a PUBREL for a message paho no longer holds (handed
    on over an earlier connection, or by an earlier process) is answered with PUBCOMP.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chunk = b""
        self._chunk_at = 0
        self._chunk_socket: Any = None
        self._wakeups = threading.local()
        self._kernel_unread_at_read = 0  # bytes left in the kernel by the last socket read
        self._chunk_is_tls = False

    @contextlib.contextmanager
    def publishing_together(self) -> Iterator[None]:
        """Publishes made by this thread inside the block wake the network thread once, at its end.

        paho wakes its network thread with a byte on a socket pair for every publish from another thread:
        a system call that releases the GIL, which under load this thread then waits a switch interval to
        take back, once per message. A thread publishing many replies at once (the outbox writer after a
        commit) pays that once. Other threads' publishes are unaffected; nested blocks are one block.
        """
        state = self._wakeups
        if getattr(state, "held", False):
            yield
            return
        state.held, state.pending = True, False
        try:
            yield
        finally:
            state.held = False
            if state.pending:
                self._wake_network_thread()

    def _packet_queue(
        self, command: int, packet: bytes | bytearray, mid: int, qos: int, info: mqtt.MQTTMessageInfo | None = None
    ) -> mqtt.MQTTErrorCode:
        state = self._wakeups
        if not getattr(state, "held", False) or self._thread is None:
            return super()._packet_queue(command, packet, mid, qos, info)
        # paho's own _packet_queue (2.x) without its wake-up byte, sent once by publishing_together.
        self._out_packet.append(
            {"command": command, "mid": mid, "qos": qos, "pos": 0, "to_process": len(packet), "packet": packet,
             "info": info}
        )  # fmt: skip
        state.pending = True
        self._call_socket_register_write()
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _wake_network_thread(self) -> None:
        sockpair = self._sockpairW
        if sockpair is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                sockpair.send(mqtt.sockpair_data)

    def _handle_connack(self) -> mqtt.MQTTErrorCode:
        # The body: acknowledge flags (bit 0: session present), then the reason code.
        body = self._in_packet["packet"]
        # Only the connection's CONNACK counts, and only one MQTT allows (fixed-header flags and the reserved
        # acknowledge flags 0): paho takes another (a protocol error) as it takes the first, and a broker
        # sending one must not make us forget QoS 2 messages we hold.
        first_and_well_formed = self._in_packet["command"] & 0x0F == 0 and not self.is_connected()
        if first_and_well_formed and len(body) >= 2 and body[1] == 0 and body[0] == 0:
            # A broker that kept no session (restarted without persistence, or our session expired) reuses
            # the packet ids of QoS 2 messages left half done; paho would keep those, stale, forever.
            self._session_absent()
        return super()._handle_connack()

    def _session_absent(self) -> None:
        """The broker accepted the connection without a session: nothing received before it is pending."""
        with self._in_message_mutex:
            self._in_messages.clear()

    def _handle_pubrel(self) -> mqtt.MQTTErrorCode:
        if not self._manual_ack:
            return super()._handle_pubrel()
        # Body: the packet identifier first. paho hands a held message on and leaves its PUBCOMP to ``ack``;
        # for one it does not hold it sends nothing, and the broker would keep resending the PUBREL on every
        # connection, the message counting against our Receive Maximum for good. Its acknowledgement on the
        # earlier connection was forgotten with that connection (AckSequencer.reset), so complete it now.
        # Only a PUBREL MQTT allows is answered: paho takes a malformed one, or one for packet id 0 (a protocol
        # error, which the broker would answer by disconnecting), as it takes any other, and so do we; and
        # nothing is sent on a connection paho no longer counts as connected.
        mid = int.from_bytes(self._in_packet["packet"][:2], "big")
        with self._in_message_mutex:
            held = mid in self._in_messages
        rc = super()._handle_pubrel()
        if (
            not held and rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and self.is_connected()
            and _valid_pubrel(self._in_packet["command"], self._in_packet["packet"], self._protocol)
        ):  # fmt: skip
            return self._send_pubcomp(mid)
        return rc

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._chunk_socket is not self._sock:  # a new connection: bytes left from the old one are void
            self._chunk, self._chunk_at, self._chunk_socket = b"", 0, self._sock
            self._kernel_unread_at_read = 0
            self._chunk_is_tls = hasattr(self._sock, "pending")
        if self._chunk_at >= len(self._chunk):
            wanted = max(bufsize, _READ_CHUNK_BYTES)
            data = self._socket_read(wanted)
            # A TCP read shorter than asked for took everything the kernel held: no system call needed to know.
            self._kernel_unread_at_read = 0 if len(data) < wanted else (self._kernel_unread() or 0)
            if len(data) <= bufsize:
                return data
            self._chunk, self._chunk_at = data, bufsize
            return data[:bufsize]
        start = self._chunk_at
        self._chunk_at = min(len(self._chunk), start + bufsize)
        return self._chunk[start : self._chunk_at]

    def _socket_read(self, size: int) -> bytes:
        """One read from the socket (paho's own ``_sock_recv``): every byte the peer sends passes here once, in
        order, a chunk at a time (the place to look at them all: :class:`~agent.mqtt.inbound_guard.GuardedClient`)."""
        return super()._sock_recv(size)

    def buffered_bytes(self) -> int:
        """Bytes read from the socket that paho has not taken yet."""
        return len(self._chunk) - self._chunk_at if self._chunk_socket is self._sock else 0

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        """paho's read, then every packet already in the chunk: ``select`` cannot see those bytes, so
        leaving them would stall them until the socket next became readable."""
        rc = super().loop_read(max_packets)
        while rc == mqtt.MQTT_ERR_SUCCESS and self.buffered_bytes() > 0:
            before = self.buffered_bytes()
            rc = super().loop_read(1)
            if self.buffered_bytes() == before:  # a packet's start whose rest has not arrived: paho keeps it
                break
        return rc

    def unread_bytes(self) -> int:
        """Bytes the broker has sent that paho has not read: in the chunk, in TLS, and in the kernel."""
        sock = self._sock
        if sock is None:
            return 0
        waiting = self._kernel_unread()
        if waiting is None:  # closed meanwhile: nothing to read from it
            return self.buffered_bytes()
        pending = getattr(sock, "pending", None)  # decrypted bytes an SSL socket holds
        return waiting + self.buffered_bytes() + (pending() if pending is not None else 0)

    def unread_bytes_as_of_last_read(self) -> int:
        """:meth:`unread_bytes` as the last socket read left it, for a check made on every message: the chunk
        still to be taken plus what the kernel held then, without a system call per message. Bytes that have
        arrived since are counted from the next read, at the latest once this chunk is taken. A TLS socket
        is asked afresh (a TLS read may stop short of what is waiting)."""
        if self._chunk_socket is not self._sock or self._chunk_is_tls:
            return self.unread_bytes()
        return self._kernel_unread_at_read + len(self._chunk) - self._chunk_at

    def _kernel_unread(self) -> int | None:
        """What waits in the kernel's receive buffer (FIONREAD); None without a usable socket."""
        sock = self._sock
        if sock is None:
            return None
        waiting = array.array("i", [0])
        try:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting, True)
        except (OSError, ValueError):
            return None
        return waiting[0]


def _valid_pubrel(command: int, body: bytes | bytearray, protocol: int) -> bool:
    """Whether a PUBREL that paho decoded is one MQTT allows: the fixed header's flags 0010, a packet identifier
    other than 0, and (MQTT 5) a property length, if any, in the fewest bytes and spanning the rest of the body
    exactly. paho checks none of these; its decoding already refused reason codes and properties a PUBREL
    cannot have."""
    if command & 0x0F != 0x02 or len(body) < 2 or body[0] == body[1] == 0:
        return False
    if len(body) == 2:
        return True
    if protocol != mqtt.MQTTv5:
        return False
    if len(body) == 3:  # a reason code alone
        return True
    length = shift = 0
    for at in range(3, min(len(body), 7)):  # the property length: a variable byte integer of 1 to 4 bytes
        length += (body[at] & 0x7F) << shift
        shift += 7
        if not body[at] & 0x80:  # the last byte; one of 0 after others is a longer encoding than needed
            return at + 1 + length == len(body) and (at == 3 or body[at] != 0)
    return False

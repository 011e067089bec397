"""MQTT 5 plumbing shared by every link the agent opens (paho-mqtt 2.x).

paho does not set TCP_NODELAY; without it each QoS 1 round trip on a quiet link waits on delayed ACKs
(~40 ms on loopback), so every client made here sets it as soon as its socket opens.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import CloudBroker, LocalBroker, TlsSettings
from agent.mqtt.chunked import ChunkedReadClient
from agent.mqtt.inbound_guard import GuardedClient, GuardedLeanClient, InboundLimits
from agent.mqtt.lean_client import LeanClient


def _enable_tcp_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def new_client(client_id: str, *, manual_ack: bool = False, lean: bool = False) -> ChunkedReadClient:
    """An MQTT 5 paho client with version-2 callbacks, chunked reads and TCP_NODELAY on its socket.

    ``lean``: the common PUBLISH and PUBACK decoded without paho's per-packet tables
    (:mod:`agent.mqtt.lean_client`); the agent's request link uses it guarded (:func:`new_guarded_client`), the
    benchmark's reference responders keep paho's own decoding, as a hand-written responder would.
    """
    kind = LeanClient if lean else ChunkedReadClient
    client = kind(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=manual_ack)
    client.on_socket_open = _enable_tcp_nodelay
    return client


def new_guarded_client(
    client_id: str, limits: InboundLimits, *, manual_ack: bool = False, lean: bool = False
) -> GuardedClient:
    """Like :func:`new_client`, for a peer that is input too: a peer that breaks ``limits`` is cut off (see
    :mod:`agent.mqtt.inbound_guard`; with ``manual_ack`` QoS 1 messages count until acknowledged)."""
    kind = GuardedLeanClient if lean else GuardedClient
    version = mqtt.CallbackAPIVersion.VERSION2
    client = kind(version, limits=limits, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=manual_ack)
    client.on_socket_open = _enable_tcp_nodelay
    return client


def configure_broker_access(client: mqtt.Client, broker: LocalBroker | CloudBroker) -> None:
    """Credentials, TLS and reconnect backoff from a broker config section."""
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        tls = broker.tls if isinstance(broker.tls, TlsSettings) else TlsSettings()
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
            cert_reqs=ssl.CERT_NONE if tls.insecure_skip_verify else ssl.CERT_REQUIRED,
        )
        if tls.insecure_skip_verify:
            client.tls_insecure_set(True)
    client.reconnect_delay_set(min_delay=broker.reconnect_min_s, max_delay=broker.reconnect_max_s)  # type: ignore[arg-type]


def backoff_delay(attempt: int, low: float, high: float, rand: Callable[[], float] = random.random) -> float:
    """Delay before connection attempt ``attempt`` (0-based): half the exponential step plus jitter, so a
    fleet does not reconnect in lockstep."""
    step = min(high, low * 2 ** min(attempt, 32))
    return step / 2 + rand() * step / 2


class WakeSocket:
    """A socket pair that wakes a thread blocked in ``select`` from any other thread."""

    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full buffer means a wake-up is already pending
            self._writer.send(b"\0")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.reader.recv(4096):
                pass


def serve_connection(
    client: mqtt.Client,
    waker: WakeSocket,
    stopping: threading.Event,
    between_rounds: Callable[[], None],
    select_timeout_s: float = 1.0,
) -> None:
    """Run paho's network loop for one connection on the calling thread until it ends.

    Uses paho's public external-loop API plus ``waker``, so the thread that owns the client can be woken
    to publish at once. ``between_rounds`` runs before every round until ``stopping`` is set (then the
    client disconnects cleanly); it is the place for this thread's paho calls.
    """
    disconnecting = False
    while True:
        if stopping.is_set() and not disconnecting:
            client.disconnect()
            disconnecting = True
        if not disconnecting:
            between_rounds()
        sock = client.socket()
        if sock is None:
            return
        pending = bool(getattr(sock, "pending", lambda: 0)())  # TLS bytes select cannot see
        readable, writable, _ = select.select(
            [sock, waker.reader], [sock] if client.want_write() else [], [], 0 if pending else select_timeout_s
        )
        if waker.reader in readable:
            waker.clear()
        if (pending or sock in readable) and client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
            return
        if sock in writable and client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
            return
        if client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
            return


class Subscriptions:
    """Topic filters a client keeps subscribed on every connection, even to a broker that lost its session.

    ``add`` may be called from any thread; ``send_pending`` only from the thread that owns the client.
    """

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client
        self._filters: dict[str, int] = {}
        self._unsent: set[str] = set()

    def add(self, topic_filter: str, qos: int, on_message: Callable[[mqtt.MQTTMessage], None]) -> None:
        self._client.message_callback_add(topic_filter, lambda client, userdata, message: on_message(message))
        self._filters[topic_filter] = qos
        self._unsent.add(topic_filter)

    def renew(self) -> None:
        """Subscribe everything again (call on every CONNACK)."""
        self._unsent.update(self._filters)  # updated in place, never replaced: add() may run meanwhile

    def send_pending(self) -> None:
        while self._unsent:
            topic_filter = self._unsent.pop()
            self._client.subscribe(topic_filter, self._filters[topic_filter])


def connect_properties(
    session_expiry: int, receive_maximum: int | None = None, maximum_packet_size: int | None = None
) -> Properties:
    """CONNECT properties. ``maximum_packet_size``: the broker must not send us a larger packet (MQTT 5
    3.1.2.11.4; mosquitto drops it instead), so an oversized publish never reaches paho, which would read it
    whole and parse its properties before anyone could check its size."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    if maximum_packet_size is not None:
        props.MaximumPacketSize = maximum_packet_size
    return props


def publish_properties(
    *,
    correlation_data: bytes | None = None,
    message_expiry: int | None = None,
    user_properties: list[tuple[str, str]] | None = None,
) -> Properties | None:
    if correlation_data is None and message_expiry is None and not user_properties:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if message_expiry is not None:
        props.MessageExpiryInterval = message_expiry
    if user_properties:
        props.UserProperty = user_properties
    return props


class AckSequencer:
    """Acknowledges received messages in arrival order, each only once it is marked done: a PUBACK for
    QoS 1, a PUBCOMP for QoS 2.

    MQTT 5 requires PUBACKs in the order the PUBLISHes arrived; the agent finishes requests out of order
    (several workers), so a finished request's acknowledgement waits for those that arrived before it.
    With ``manual_ack`` paho answers a QoS 2 PUBLISH with PUBREC itself and hands the message on at its
    PUBREL; what is left to send is the PUBCOMP, and a PUBACK in its place is a protocol error the broker
    answers by disconnecting (the QoS 2 message then stays unfinished in the session).
    """

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self._exactly_once: set[int] = set()  # the QoS 2 ones among _order (kept apart: QoS 1 is the hot path)
        self._generation = 0

    @property
    def generation(self) -> int:
        """Changes on every reconnect: message ids of an older connection must not be acknowledged."""
        return self._generation

    def received(self, mid: int, qos: int = 1) -> None:
        with self._lock:
            self._order.append(mid)
            if qos == 2:
                self._exactly_once.add(mid)

    def done(self, mid: int, generation: int) -> None:
        # Acknowledging under the lock keeps two finishing workers from interleaving their acknowledgements.
        with self._lock:
            if generation != self._generation:
                return
            self._done.add(mid)
            while self._order and self._order[0] in self._done:
                head = self._order.popleft()
                self._done.discard(head)
                if self._exactly_once and head in self._exactly_once:
                    self._exactly_once.discard(head)
                    self._client.ack(head, 2)
                else:
                    self._client.ack(head, 1)

    def reset(self) -> None:
        """Forget pending acknowledgements: after reconnecting the broker sends those QoS 1 messages again,
        and the PUBREL of those QoS 2 ones, which the client completes itself (``ChunkedReadClient``)."""
        with self._lock:
            self._order.clear()
            self._done.clear()
            self._exactly_once.clear()
            self._generation += 1

    def pending(self) -> int:
        with self._lock:
            return len(self._order)

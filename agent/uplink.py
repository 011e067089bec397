"""The cloud uplink: a second MQTT 5 client that drains the outbox to the cloud broker.

Delivery. Rows are claimed from the outbox and published at QoS 1 to ``mcp/up/{device_id}/{class}``, up to
``inflight_window`` (default 32, lowered to the broker's Receive Maximum) awaiting PUBACK at once. A row is
deleted only when its PUBACK carries a reason code below 0x80 (0x10 "no matching subscribers" included);
0x80 and above dead-letters it (see :mod:`agent.outbox` for the retry policy). Each message carries its
``msg_id`` in the payload and as the MQTT 5 user property ``msg-id``; the cloud drops repeats by it.

Order. Per class, messages go out in outbox order on one connection, and the broker keeps that order. When
the connection drops, every publish still awaiting its PUBACK is abandoned (paho's copy is dropped rather
than retransmitted) and its row released; after reconnecting, claiming starts again from the oldest
unacknowledged row. So, after dropping repeats by msg-id, each class arrives in enqueue order: the repeats
are the tail of the window that was in flight. The exception is a dead-lettered message: the rows behind it
are not held back, so a retried dead letter arrives late. Its ``seq`` (the outbox row id, increasing in
enqueue order) and ``enqueued_at`` let the cloud put it back in place. Re-publishing with a new packet id
instead of resending the old one is harmless at QoS 1 (brokers do not deduplicate QoS 1 by packet id) and
lets the outbox, not the client library's memory, decide what is resent and with what remaining expiry.

Failures. Connection attempts back off exponentially from ``reconnect_min_s`` to ``reconnect_max_s`` with
jitter (never below half the step, so a fleet does not reconnect in lockstep), all on the monotonic clock.
The backoff resets only after a connection stayed up for a while, so a broker that accepts and then drops
us is not hammered. While not connected the drain does no work at all (open circuit): requests only ever
touch the outbox, never the uplink, so a dead cloud costs the request path nothing.

Upstream envelope (UTF-8 JSON): ``{"msg_id", "class", "seq", "device_id", "enqueued_at", "age_ms", "body"}``
where ``enqueued_at`` is the device's wall clock at enqueue (unreliable before NTP sync on boards without an
RTC) and ``age_ms`` the time the message has spent on the device, measured on its boot clock (reliable);
``body`` is the stored JSON document. MQTT 5 Message Expiry is the remaining TTL.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field

from agent.config import CloudBroker, TlsSettings
from agent.errors import OutboxError
from agent.topics import upstream_topic

log = logging.getLogger(__name__)

UplinkState = Literal["connected", "disconnected", "backoff"]
_STABLE_CONNECTION_S = 10.0
_LOOP_TIMEOUT_S = 1.0
_IDLE_WAKE_S = 1.0
_PACKET_OVERHEAD = 256
_REASON_PACKET_TOO_LARGE = 0x95


class ClaimedRecord(Protocol):
    """What the uplink needs of a claimed outbox row (``agent.outbox.OutboxRecord`` has it)."""

    @property
    def id(self) -> int: ...
    @property
    def msg_id(self) -> str: ...
    @property
    def cls(self) -> str: ...
    @property
    def body(self) -> bytes: ...
    @property
    def enqueued_wall(self) -> float: ...
    @property
    def age_s(self) -> float: ...
    @property
    def remaining_ttl_s(self) -> float | None: ...


class OutboxPort(Protocol):
    """The part of ``agent.outbox.Outbox`` the uplink drives (adapters do not import each other)."""

    def claim_batch(self, limit: int) -> Sequence[ClaimedRecord]: ...
    def mark_delivered(self, ids: Iterable[int]) -> int: ...
    def mark_failed_many(self, failures: Sequence[tuple[int, int]]) -> None: ...
    def release_claims(self, ids: Iterable[int] | None = None) -> int: ...
    def add_queued_listener(self, callback: Callable[[], None]) -> None: ...


class UpstreamRecord(BaseModel):
    """The upstream envelope, as the cloud side parses it."""

    model_config = ConfigDict(populate_by_name=True)

    msg_id: str
    cls: str = Field(alias="class")
    seq: int
    device_id: str
    enqueued_at: float
    age_ms: int
    body: Any


class CloudMessage(BaseModel):
    """A message received on a cloud subscription (see :meth:`Uplink.subscribe`)."""

    topic: str
    payload: bytes
    user_properties: dict[str, str]
    correlation_data: bytes | None = None


class UplinkStats(BaseModel):
    state: UplinkState
    inflight: int
    window: int
    published: int
    delivered: int
    refused: int
    connects: int
    connect_failures: int
    last_error: str | None


def encode_envelope(record: ClaimedRecord, device_id: str) -> bytes:
    """The upstream payload; the stored body (already JSON) is spliced in without re-encoding."""
    head = {
        "msg_id": record.msg_id,
        "class": record.cls,
        "seq": record.id,
        "device_id": device_id,
        "enqueued_at": record.enqueued_wall,
        "age_ms": int(record.age_s * 1000),
    }
    return json.dumps(head, separators=(",", ":")).encode()[:-1] + b',"body":' + record.body + b"}"


def backoff_delay(attempt: int, low: float, high: float, rand: Callable[[], float] = random.random) -> float:
    """Delay before connection attempt ``attempt`` (0-based): half the exponential step plus jitter."""
    step = min(high, low * 2 ** min(attempt, 32))
    return step / 2 + rand() * step / 2


def _enable_tcp_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # QoS 1 round trips otherwise stall on delayed ACKs (Nagle), capping a window's throughput.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        log.debug("TCP_NODELAY not available on %r", sock)


def _tls_context(tls: bool | TlsSettings | None) -> ssl.SSLContext | None:
    if not tls:
        return None
    if tls is True:
        return ssl.create_default_context()
    assert isinstance(tls, TlsSettings)
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Uplink:
    """Drains ``outbox`` to the ``cloud`` broker from two threads.

    The connection thread owns the paho client: every paho call happens on it, because paho 2.x is not
    safe for concurrent use (a publish from another thread writes to the socket alongside the loop and can
    reorder packets). The drain thread does the outbox's disk work (claims, acknowledgements) so that a
    slow fsync never stalls the network, and hands claimed rows over through ``_to_publish``.
    """

    def __init__(self, outbox: OutboxPort, cloud: CloudBroker, device_id: str, *, client_id: str | None = None) -> None:
        self._outbox = outbox
        self._cloud = cloud
        self._device_id = device_id
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or device_id, protocol=mqtt.MQTTv5
        )
        self._client.on_socket_open = _enable_tcp_nodelay
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.max_inflight_messages_set(cloud.inflight_window)
        if cloud.username is not None:
            self._client.username_pw_set(cloud.username, cloud.password)
        context = _tls_context(cloud.tls)
        if context is not None:
            self._client.tls_set_context(context)
        connect_properties = Properties(PacketTypes.CONNECT)
        connect_properties.SessionExpiryInterval = cloud.session_expiry
        self._client.connect_async(
            cloud.host, cloud.port, cloud.keepalive, clean_start=False, properties=connect_properties
        )
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        # _handoff guards the connection generation and the rows between the two threads; the connection
        # thread never calls paho while holding it.
        self._handoff = threading.Lock()
        self._gen = 0
        self._connected_gen = -1
        self._to_publish: collections.deque[ClaimedRecord] = collections.deque()
        self._inflight: dict[int, ClaimedRecord] = {}  # paho mid -> row, connection thread only
        self._acks: collections.deque[tuple[int, int]] = collections.deque()  # (row id, PUBACK reason)
        self._lost: collections.deque[int] = collections.deque()  # row ids to release
        self._unsettled_ok: list[int] = []
        self._unsettled_refused: list[tuple[int, int]] = []
        self._unreleased: list[int] = []
        self._drain_cond = threading.Condition()
        self._drain_woken = False
        self._has_work = True
        self._window = cloud.inflight_window
        self._max_packet: int | None = None
        self._subscriptions: dict[str, int] = {}
        self._unsent_subscriptions: set[str] = set()
        self._state: UplinkState = "disconnected"
        self._connected_since: float | None = None
        self._accepting = True
        self._stopping = threading.Event()
        self._drain_done = False
        self._counts = collections.Counter[str]()
        self._last_error: str | None = None
        self._threads: list[threading.Thread] = []
        outbox.add_queued_listener(self._on_rows_queued)

    # -- public API ---------------------------------------------------------------------------------

    @property
    def state(self) -> UplinkState:
        return self._state

    def start(self) -> None:
        """Start connecting (in the background) and draining; returns at once."""
        if self._threads:
            return
        self._stopping.clear()
        self._accepting, self._drain_done = True, False
        self._threads = [
            threading.Thread(target=self._run_connection, name="uplink-connection", daemon=True),
            threading.Thread(target=self._run_drain, name="uplink-drain", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop claiming, give in-flight publishes up to ``timeout`` s for their PUBACKs, then disconnect.

        Rows still unacknowledged are released back to the queue (sent again next time).
        """
        if not self._threads:
            return
        self._accepting = False
        with self._drain_cond:
            self._drain_cond.wait_for(lambda: not (self._inflight or self._to_publish), timeout=timeout)
        self._stopping.set()
        self._wake_connection()
        self._threads[0].join()
        self._drain_done = True
        self._wake_drain()
        self._threads[1].join()
        self._threads = []

    def stats(self) -> UplinkStats:
        return UplinkStats(
            state=self._state,
            inflight=len(self._inflight) + len(self._to_publish),
            window=self._window,
            published=self._counts["published"],
            delivered=self._counts["delivered"],
            refused=self._counts["refused"],
            connects=self._counts["connects"],
            connect_failures=self._counts["connect_failures"],
            last_error=self._last_error,
        )

    def subscribe(self, topic_filter: str, handler: Callable[[CloudMessage], None], qos: int = 1) -> None:
        """Receive cloud messages matching ``topic_filter`` (e.g. ``mcp/cloud/res/{device_id}``).

        The subscription is renewed on every connection. ``handler`` runs on the connection thread and
        must not block; its exceptions are logged, never propagated.
        """

        def deliver(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            properties = getattr(message, "properties", None)
            try:
                handler(
                    CloudMessage(
                        topic=message.topic,
                        payload=bytes(message.payload),
                        user_properties=dict(getattr(properties, "UserProperty", []) or []),
                        correlation_data=getattr(properties, "CorrelationData", None),
                    )
                )
            except Exception:
                log.exception("cloud message handler for %s failed", topic_filter)

        self._client.message_callback_add(topic_filter, deliver)
        self._subscriptions[topic_filter] = qos
        self._unsent_subscriptions.add(topic_filter)
        self._wake_connection()

    # -- paho callbacks (connection thread) ---------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            self._last_error = f"cloud refused the connection: {reason}"
            self._counts["connect_failures"] += 1
            return
        receive_maximum = getattr(props, "ReceiveMaximum", None)
        self._window = min(self._cloud.inflight_window, receive_maximum or self._cloud.inflight_window)
        self._max_packet = getattr(props, "MaximumPacketSize", None)
        self._unsent_subscriptions.update(self._subscriptions)  # the same set: subscribe() may add to it now
        self._connected_since = time.monotonic()
        self._counts["connects"] += 1
        self._connected_gen = self._gen
        self._state = "connected"
        log.info("uplink connected to %s:%d", self._cloud.host, self._cloud.port)
        self._wake_drain()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if not self._stopping.is_set():
            self._last_error = f"disconnected: {reason}"

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        record = self._inflight.pop(mid, None)
        if record is not None:
            self._acks.append((record.id, int(reason.value)))
            self._wake_drain()

    def _on_rows_queued(self) -> None:
        self._has_work = True
        self._wake_drain()

    def _wake_drain(self) -> None:
        with self._drain_cond:
            self._drain_woken = True
            self._drain_cond.notify_all()

    def _wake_connection(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full buffer means a wake-up is already pending
            self._wake_writer.send(b"\0")

    # -- connection thread --------------------------------------------------------------------------

    def _run_connection(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._state = "disconnected"
            try:
                self._client.reconnect()
                self._serve()
            except Exception as exc:  # any failure to connect means: back off and try again
                self._last_error = f"cannot connect to {self._cloud.host}:{self._cloud.port}: {exc}"
                self._counts["connect_failures"] += 1
            stable = (
                self._connected_since is not None and time.monotonic() - self._connected_since >= _STABLE_CONNECTION_S
            )
            self._connection_lost()
            if self._stopping.is_set():
                break
            attempt = 0 if stable else attempt + 1
            delay = backoff_delay(attempt, self._cloud.reconnect_min_s, self._cloud.reconnect_max_s)
            log.info("uplink: %s; next attempt in %.1f s", self._last_error, delay)
            self._state = "backoff"
            self._stopping.wait(delay)
        self._state = "disconnected"

    def _serve(self) -> None:
        """paho's network loop, on its public external-loop API plus our own wake-up socket."""
        client, disconnecting = self._client, False
        while True:
            if self._stopping.is_set() and not disconnecting:
                client.disconnect()
                disconnecting = True
            if self._state == "connected" and not disconnecting:
                self._send_subscriptions()
                self._publish_handed_over()
            sock = client.socket()
            if sock is None:
                return
            pending = bool(getattr(sock, "pending", lambda: 0)())  # TLS bytes select cannot see
            readable, writable, _ = select.select(
                [sock, self._wake_reader], [sock] if client.want_write() else [], [], 0 if pending else _LOOP_TIMEOUT_S
            )
            if self._wake_reader in readable:
                with contextlib.suppress(BlockingIOError):
                    while self._wake_reader.recv(4096):
                        pass
            if (pending or sock in readable) and client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                return
            if sock in writable and client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                return
            if client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                return

    def _send_subscriptions(self) -> None:
        while self._unsent_subscriptions:
            topic = self._unsent_subscriptions.pop()
            self._client.subscribe(topic, self._subscriptions[topic])

    def _publish_handed_over(self) -> None:
        while self._to_publish:
            record = self._to_publish.popleft()
            payload = encode_envelope(record, self._device_id)
            topic = upstream_topic(self._device_id, record.cls)
            if self._max_packet and len(payload) + len(topic) + _PACKET_OVERHEAD > self._max_packet:
                self._acks.append((record.id, _REASON_PACKET_TOO_LARGE))
                self._wake_drain()
                continue
            info = self._client.publish(topic, payload, qos=1, properties=self._properties(record))
            self._inflight[info.mid] = record
            self._counts["published"] += 1

    def _connection_lost(self) -> None:
        with self._handoff:
            self._gen += 1
            self._state = "disconnected"
            self._lost.extend(record.id for record in self._inflight.values())
            self._lost.extend(record.id for record in self._to_publish)
            self._inflight.clear()
            self._to_publish.clear()
        # Never let paho resend its copies: the outbox decides what goes out again, and in which order.
        self._client.drop_out_messages()
        self._connected_since = None
        self._wake_drain()

    @staticmethod
    def _properties(record: ClaimedRecord) -> Properties:
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [("msg-id", record.msg_id)]
        properties.ContentType = "application/json"
        properties.PayloadFormatIndicator = 1
        if record.remaining_ttl_s is not None:
            properties.MessageExpiryInterval = max(1, math.ceil(record.remaining_ttl_s))
        return properties

    # -- drain thread -------------------------------------------------------------------------------

    def _run_drain(self) -> None:
        while True:
            with self._drain_cond:
                self._drain_cond.wait_for(lambda: self._drain_woken, timeout=_IDLE_WAKE_S)
                self._drain_woken = False
            # Read first: _drain_done is set only after the connection thread has moved every
            # unacknowledged row to _lost, so a finishing pass releases them all.
            finishing = self._drain_done
            try:
                self._release_lost()
                if not finishing:
                    # Refill the window before recording acknowledgements: a claim needs no fsync, so the
                    # network is busy while the acknowledgements wait for theirs.
                    self._claim_more()
                self._record_acks()
            except OutboxError as exc:
                self._has_work = True
                log.error("uplink cannot update the outbox, will retry: %s", exc)
            with self._drain_cond:
                self._drain_cond.notify_all()  # stop() may be waiting for the window to empty
            if finishing:
                return

    def _release_lost(self) -> None:
        """Give back rows whose connection ended unacknowledged, before anything newer is claimed."""
        while self._lost:
            self._unreleased.append(self._lost.popleft())
        if self._unreleased:
            self._outbox.release_claims(self._unreleased)
            self._unreleased = []
            self._has_work = True

    def _record_acks(self) -> None:
        while self._acks:
            row_id, reason = self._acks.popleft()
            if reason < 0x80:
                self._unsettled_ok.append(row_id)
            else:
                self._unsettled_refused.append((row_id, reason))
        if self._unsettled_ok:
            self._outbox.mark_delivered(self._unsettled_ok)
            self._counts["delivered"] += len(self._unsettled_ok)
            self._unsettled_ok = []
        if self._unsettled_refused:
            self._outbox.mark_failed_many(self._unsettled_refused)
            self._counts["refused"] += len(self._unsettled_refused)
            self._unsettled_refused = []

    def _claim_more(self) -> None:
        if not (self._accepting and self._has_work and self._state == "connected"):
            return
        room = self._window - len(self._inflight) - len(self._to_publish)
        with self._handoff:
            # Rows of an ended connection not yet back in the queue are older than anything a claim
            # would return now: claiming past them would break per-class order.
            if room <= 0 or self._lost or self._unreleased or self._connected_gen != self._gen:
                return
            generation = self._gen
        self._has_work = False  # before claiming, so a listener call during the claim is not lost
        records = self._outbox.claim_batch(room)
        if len(records) == room:
            self._has_work = True
        if not records:
            return
        with self._handoff:
            handed_over = self._gen == generation and self._connected_gen == generation
            if handed_over:
                self._to_publish.extend(records)
            else:
                self._lost.extend(record.id for record in records)
        if handed_over:
            self._wake_connection()
        else:
            self._wake_drain()

"""The cloud uplink: a second MQTT 5 client that drains the outbox to the cloud broker.

Delivery. Rows are claimed from the outbox and published at QoS 1 to ``mcp/up/{device_id}/{class}``, up to
``inflight_window`` (default 32, lowered to the broker's Receive Maximum) awaiting PUBACK at once. A row is
deleted only when its PUBACK carries a reason code below 0x80 (0x10 "no matching subscribers" included);
0x80 and above dead-letters it (see :mod:`agent.upstream.outbox` for the retry policy). Each message carries its
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

Batching (``[cloud] batch``, for metered links): the records of a class travel many per message, zlib
compressed, on ``mcp/up/{device_id}/{class}/batch`` (:mod:`agent.upstream.uplink_batch` decides what leaves when).
A batch is one QoS 1 publish and settles all its rows together: a success PUBACK deletes every one, a
refusal dead-letters every one. Each record inside keeps its own ``msg_id``, so the cloud still drops
repeats per record, and batches of a class leave in order, so the guarantees above hold record by record.

Envelopes (single and batch) are defined in :mod:`agent.upstream.uplink_wire`; docs/cloud.md is the cloud side's
contract. MQTT 5 Message Expiry is the remaining TTL (of a batch: the shortest among its records).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel

from agent.config import CloudBroker
from agent.errors import OutboxError
from agent.faults import HEARTBEATS, INTERNAL_ERRORS
from agent.mqtt.transport import (
    Subscriptions,
    WakeSocket,
    backoff_delay,
    configure_broker_access,
    connect_properties,
    new_client,
    serve_connection,
)
from agent.upstream.uplink_batch import Batcher, Publication
from agent.upstream.uplink_wire import ClaimedRecord, UpstreamRecord

__all__ = ["ClaimedRecord", "CloudMessage", "OutboxPort", "Uplink", "UplinkStats", "UpstreamRecord", "backoff_delay"]

log = logging.getLogger(__name__)

UplinkState = Literal["connected", "disconnected", "backoff"]
_STABLE_CONNECTION_S = 10.0
_IDLE_WAKE_S = 1.0
_REASON_PACKET_TOO_LARGE = 0x95


class OutboxPort(Protocol):
    """The part of ``agent.upstream.outbox.Outbox`` the uplink drives (adapters do not import each other)."""

    def claim_batch(self, limit: int) -> Sequence[ClaimedRecord]: ...
    def mark_delivered(self, ids: Iterable[int]) -> int: ...
    def mark_failed_many(self, failures: Sequence[tuple[int, int]]) -> None: ...
    def release_claims(self, ids: Iterable[int] | None = None) -> int: ...
    def add_queued_listener(self, callback: Callable[[], None]) -> None: ...


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
    batches: int
    buffered: int
    delivered: int
    refused: int
    connects: int
    connect_failures: int
    last_error: str | None


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
        self._client = new_client(client_id or device_id)
        configure_broker_access(self._client, cloud)
        # A callback's exception would end the connection thread's round; each is guarded instead.
        self._client.on_connect = INTERNAL_ERRORS.wrap("uplink_connect", self._on_connect)
        self._client.on_disconnect = INTERNAL_ERRORS.wrap("uplink_disconnect", self._on_disconnect)
        self._client.on_publish = INTERNAL_ERRORS.wrap("uplink_publish", self._on_publish)
        self._client.max_inflight_messages_set(cloud.inflight_window)
        properties = connect_properties(cloud.session_expiry, maximum_packet_size=cloud.max_packet_bytes)
        self._client.connect_async(cloud.host, cloud.port, cloud.keepalive, clean_start=False, properties=properties)
        self._waker = WakeSocket()
        # _handoff guards the connection generation and the rows between the two threads; the connection
        # thread never calls paho while holding it.
        self._handoff = threading.Lock()
        self._gen = 0
        self._connected_gen = -1
        self._to_publish: collections.deque[Publication] = collections.deque()
        self._inflight: dict[int, Publication] = {}  # paho mid -> publication, connection thread only
        self._batcher = Batcher(cloud, device_id)  # drain thread only
        self._batcher_gen = 0  # the connection generation the held rows were claimed in
        self._acks: collections.deque[tuple[int, int]] = collections.deque()  # (row id, PUBACK reason)
        self._lost: collections.deque[int] = collections.deque()  # row ids to release
        self._unsettled_ok: list[int] = []
        self._unsettled_refused: list[tuple[int, int]] = []
        self._unreleased: list[int] = []
        self._drain_cond = threading.Condition()
        self._drain_woken = False
        self._settled = False  # set by the drain: nothing held, handed over or awaiting a PUBACK
        self._has_work = True
        self._window = cloud.inflight_window
        self._linger_s = cloud.drain_linger_ms / 1000
        self._backlog = False  # the last claim filled all the room it had: rows are waiting
        self._max_packet: int | None = None
        self._subscriptions = Subscriptions(self._client)
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

        Records held for a batch are sent at once. Rows still unacknowledged are released back to the queue
        (sent again next time).
        """
        if not self._threads:
            return
        with self._drain_cond:
            self._accepting, self._settled, self._drain_woken = False, False, True
            self._drain_cond.notify_all()
            self._drain_cond.wait_for(lambda: self._settled, timeout=timeout)
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
            batches=self._counts["batches"],
            buffered=self._batcher.buffered,
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

        def deliver(message: mqtt.MQTTMessage) -> None:
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

        self._subscriptions.add(topic_filter, qos, deliver)
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
        self._subscriptions.renew()
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
        publication = self._inflight.pop(mid, None)
        if publication is not None:
            self._acks.extend((row_id, int(reason.value)) for row_id in publication.row_ids)
            self._wake_drain()

    def _on_rows_queued(self) -> None:
        self._has_work = True
        self._wake_drain()

    def _wake_drain(self) -> None:
        with self._drain_cond:
            self._drain_woken = True
            self._drain_cond.notify_all()

    def _wake_connection(self) -> None:
        self._waker.wake()

    # -- connection thread --------------------------------------------------------------------------

    def _run_connection(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._state = "disconnected"
            try:
                self._client.reconnect()
                serve_connection(self._client, self._waker, self._stopping, self._between_rounds)
            except Exception as exc:  # any failure to connect means: back off and try again
                self._last_error = f"cannot connect to {self._cloud.host}:{self._cloud.port}: {exc}"
                self._counts["connect_failures"] += 1
            stable = (
                self._connected_since is not None and time.monotonic() - self._connected_since >= _STABLE_CONNECTION_S
            )
            with INTERNAL_ERRORS.guard("uplink_connection"):
                self._connection_lost()
            if self._stopping.is_set():
                break
            attempt = 0 if stable else attempt + 1
            delay = backoff_delay(attempt, self._cloud.reconnect_min_s, self._cloud.reconnect_max_s)
            log.info("uplink: %s; next attempt in %.1f s", self._last_error, delay)
            self._state = "backoff"
            self._stopping.wait(delay)
        self._state = "disconnected"

    def _between_rounds(self) -> None:
        if self._state == "connected":
            self._subscriptions.send_pending()
            self._publish_handed_over()

    def _publish_handed_over(self) -> None:
        while self._to_publish:
            # Removed only once in _inflight, so stop() never sees it in neither.
            publication = self._to_publish[0]
            info = self._client.publish(
                publication.topic, publication.payload, qos=1, properties=publication.properties
            )
            self._inflight[info.mid] = publication
            self._to_publish.popleft()
            self._counts["published"] += len(publication.row_ids)
            self._counts["batches"] += publication.batch

    def _connection_lost(self) -> None:
        with self._handoff:
            self._gen += 1
            self._state = "disconnected"
            for publication in (*self._inflight.values(), *self._to_publish):
                self._lost.extend(publication.row_ids)
            self._inflight.clear()
            self._to_publish.clear()
        # Never let paho resend its copies: the outbox decides what goes out again, and in which order.
        self._client.drop_out_messages()
        self._connected_since = None
        self._wake_drain()

    # -- drain thread -------------------------------------------------------------------------------

    def _run_drain(self) -> None:
        while True:
            with self._drain_cond:
                self._drain_cond.wait_for(lambda: self._drain_woken, timeout=self._drain_wait())
                self._drain_woken = False
            if self._linger_s and self._accepting and not self._backlog:
                # Under request load every PUBACK and every commit wakes the drain; acting on each one costs
                # two outbox transactions and four thread hand-offs per record. A backlog is not held back:
                # there the window, not the wake-ups, sets the pace.
                self._stopping.wait(self._linger_s)
            # Read first: _drain_done is set only after the connection thread has moved every
            # unacknowledged row to _lost, so a finishing pass releases them all.
            finishing = self._drain_done
            try:
                with HEARTBEATS.busy("uplink-drain"):
                    self._release_lost(finishing)
                    if not finishing:
                        # Refill the window before recording acknowledgements: a claim needs no fsync, so the
                        # network is busy while the acknowledgements wait for theirs.
                        self._claim_more()
                        self._hand_over_ready()
                    self._record_acks()
            except OutboxError as exc:
                self._has_work = True
                log.error("uplink cannot update the outbox, will retry: %s", exc)
            except Exception as exc:  # a bug costs this round, never the drain; the rows stay for the next
                self._has_work = True
                INTERNAL_ERRORS.record("uplink_drain", exc)
            with self._drain_cond:
                self._settled = not (self._inflight or self._to_publish or self._batcher.buffered)
                self._drain_cond.notify_all()  # stop() may be waiting for the window to empty
            if finishing:
                return

    def _drain_wait(self) -> float:
        """Seconds until the drain must look again without being woken: when a held batch falls due.

        With the window full (or no connection) a due batch cannot leave; a PUBACK or CONNACK wakes the
        drain then, so waiting for the due time would only spin.
        """
        due = self._batcher.next_due()
        if due is None or self._free_slots() <= 0 or self._state != "connected":
            return _IDLE_WAKE_S
        return min(_IDLE_WAKE_S, max(0.0, due - time.monotonic()))

    def _release_lost(self, finishing: bool) -> None:
        """Give back rows whose connection ended unacknowledged, before anything newer is claimed.

        Rows held for a batch go back too: they are newer than the lost ones of their class, and sending
        them first would break the class's order.
        """
        with self._handoff:
            stale = self._batcher_gen != self._gen
        if stale or finishing:
            self._unreleased.extend(self._batcher.take_all())
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

    def _free_slots(self) -> int:
        return self._window - len(self._inflight) - len(self._to_publish)

    def _claim_more(self) -> None:
        if not (self._accepting and self._has_work and self._state == "connected"):
            return
        room = self._batcher.claim_limit(self._free_slots())
        with self._handoff:
            # Rows of an ended connection not yet back in the queue are older than anything a claim
            # would return now: claiming past them would break per-class order.
            if room <= 0 or self._lost or self._unreleased or self._connected_gen != self._gen:
                return
            generation = self._gen
            if self._batcher.buffered and self._batcher_gen != generation:
                return
        self._has_work = False  # before claiming, so a listener call during the claim is not lost
        records = self._outbox.claim_batch(room)
        self._backlog = len(records) == room
        if self._backlog:
            self._has_work = True
        self._batcher.add(records)
        self._batcher_gen = generation

    def _hand_over_ready(self) -> None:
        """Pass the publications that are due to the connection thread, as far as the window allows."""
        slots = self._free_slots()
        if not self._batcher.buffered or slots <= 0 or self._state != "connected":
            return
        publications, too_large = self._batcher.take(slots, max_packet=self._max_packet, flush=not self._accepting)
        self._acks.extend((row_id, _REASON_PACKET_TOO_LARGE) for row_id in too_large)
        if not publications:
            return
        with self._handoff:
            handed_over = self._gen == self._batcher_gen and self._connected_gen == self._batcher_gen
            if handed_over:
                self._to_publish.extend(publications)
            else:
                for publication in publications:
                    self._lost.extend(publication.row_ids)
        if handed_over:
            self._wake_connection()
        else:
            self._wake_drain()

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

A hostile cloud broker. The CONNECT announces ``[cloud] receive_maximum`` (QoS 2 messages the broker may leave
unreleased) and ``max_packet_bytes``; the client reads through :class:`~agent.mqtt.inbound_guard.InboundGuard`,
which cuts the connection the moment the broker exceeds either (a 200 MB answer is refused from its header,
unread), counts it (``cloud_peer_violation``) and backs off as after any short-lived connection.

Envelopes (single and batch) are defined in :mod:`agent.upstream.uplink_wire`; docs/cloud.md is the cloud side's
contract. MQTT 5 Message Expiry is the remaining TTL (of a batch: the shortest among its records).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel

from agent.config import CloudBroker
from agent.faults import INTERNAL_ERRORS
from agent.mqtt.inbound_guard import InboundLimits
from agent.mqtt.transport import (
    Subscriptions,
    WakeSocket,
    backoff_delay,
    configure_broker_access,
    connect_properties,
    new_guarded_client,
    serve_connection,
)
from agent.upstream.uplink_drain import Drain, OutboxPort, PublishWindow
from agent.upstream.uplink_wire import ClaimedRecord, UpstreamRecord

__all__ = ["ClaimedRecord", "CloudMessage", "OutboxPort", "Uplink", "UplinkStats", "UpstreamRecord", "backoff_delay"]

log = logging.getLogger(__name__)

UplinkState = Literal["connected", "disconnected", "backoff"]
_STABLE_CONNECTION_S = 10.0


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
    peer_violations: int
    last_error: str | None


class Uplink:
    """Drains ``outbox`` to the ``cloud`` broker from two threads.

    The connection thread owns the paho client: every paho call happens on it, because paho 2.x is not
    safe for concurrent use (a publish from another thread writes to the socket alongside the loop and can
    reorder packets). The drain thread does the outbox's disk work (claims, acknowledgements) so that a
    slow fsync never stalls the network (:class:`~agent.upstream.uplink_drain.Drain`), and hands publications
    over through the shared :class:`~agent.upstream.uplink_drain.PublishWindow`.
    """

    def __init__(
        self,
        outbox: OutboxPort,
        cloud: CloudBroker,
        device_id: str,
        *,
        client_id: str | None = None,
        count: Callable[[str], None] = lambda name: None,
    ) -> None:
        self._cloud = cloud
        self._count_event = count
        # The cloud broker is input too: one that ignores the limits announced below is cut off, not obeyed.
        self._client = new_guarded_client(
            client_id or device_id, InboundLimits(cloud.max_packet_bytes, cloud.receive_maximum)
        )
        configure_broker_access(self._client, cloud)
        # A callback's exception would end the connection thread's round; each is guarded instead.
        self._client.on_connect = INTERNAL_ERRORS.wrap("uplink_connect", self._on_connect)
        self._client.on_disconnect = INTERNAL_ERRORS.wrap("uplink_disconnect", self._on_disconnect)
        self._client.on_publish = INTERNAL_ERRORS.wrap("uplink_publish", self._on_publish)
        self._client.max_inflight_messages_set(cloud.inflight_window)
        properties = connect_properties(
            cloud.session_expiry, receive_maximum=cloud.receive_maximum, maximum_packet_size=cloud.max_packet_bytes
        )
        self._client.connect_async(cloud.host, cloud.port, cloud.keepalive, clean_start=False, properties=properties)
        self._waker = WakeSocket()
        self._window = PublishWindow(cloud.inflight_window)
        self._subscriptions = Subscriptions(self._client)
        self._state: UplinkState = "disconnected"
        self._connected_since: float | None = None
        self._stopping = threading.Event()
        self._drain = Drain(
            outbox,
            cloud,
            device_id,
            self._window,
            is_connected=lambda: self._state == "connected",
            wake_connection=self._wake_connection,
        )
        self._counts = collections.Counter[str]()
        self._last_error: str | None = None
        self._threads: list[threading.Thread] = []
        self._transient: collections.deque[tuple[str, bytes]] = collections.deque()

    # -- public API ---------------------------------------------------------------------------------

    @property
    def state(self) -> UplinkState:
        return self._state

    def start(self) -> None:
        """Start connecting (in the background) and draining; returns at once."""
        if self._threads:
            return
        self._stopping.clear()
        self._drain.reset()
        self._threads = [
            threading.Thread(target=self._run_connection, name="uplink-connection", daemon=True),
            threading.Thread(target=self._drain.run, name="uplink-drain", daemon=True),
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
        self._drain.settle(timeout)
        self._stopping.set()
        self._wake_connection()
        self._threads[0].join()
        self._drain.finish()
        self._threads[1].join()
        self._threads = []

    def stats(self) -> UplinkStats:
        return UplinkStats(
            state=self._state,
            inflight=len(self._window.inflight) + len(self._window.to_publish),
            window=self._window.size,
            published=self._counts["published"],
            batches=self._counts["batches"],
            buffered=self._drain.buffered,
            delivered=self._drain.counts["delivered"],
            refused=self._drain.counts["refused"],
            connects=self._counts["connects"],
            connect_failures=self._counts["connect_failures"],
            peer_violations=self._counts["peer_violations"],
            last_error=self._last_error,
        )

    def subscribe(self, topic_filter: str, handler: Callable[[CloudMessage], None], qos: int = 1) -> None:
        """Receive cloud messages matching ``topic_filter`` (e.g. ``mcp/cloud/res/{device_id}``).

        The subscription is renewed on every connection. ``handler`` runs on the connection thread and
        must not block; its exceptions are recorded as internal errors (``uplink_message``), never propagated.
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
            except Exception as exc:  # counted and rate-limited: a cloud broker sends as often as it likes
                INTERNAL_ERRORS.record("uplink_message", exc)

        self._subscriptions.add(topic_filter, qos, deliver)
        self._wake_connection()

    def publish_transient(self, topic: str, payload: bytes) -> bool:
        """Publish a message that is not worth storing (QoS 0, e.g. a request the caller repeats on timeout).

        Sent on the connection thread if the link is up; returns False at once (dropped) when it is not.
        """
        if self._state != "connected":
            return False
        self._transient.append((topic, payload))
        self._wake_connection()
        return True

    # -- paho callbacks (connection thread) ---------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            self._last_error = f"cloud refused the connection: {reason}"
            self._counts["connect_failures"] += 1
            return
        receive_maximum = getattr(props, "ReceiveMaximum", None)
        self._window.size = min(self._cloud.inflight_window, receive_maximum or self._cloud.inflight_window)
        self._window.max_packet = getattr(props, "MaximumPacketSize", None)
        self._subscriptions.renew()
        self._connected_since = time.monotonic()
        self._counts["connects"] += 1
        self._window.connected_generation = self._window.generation
        self._state = "connected"
        log.info("uplink connected to %s:%d", self._cloud.host, self._cloud.port)
        self._drain.wake()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if not self._stopping.is_set():
            self._last_error = f"disconnected: {reason}"

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        publication = self._window.inflight.pop(mid, None)
        if publication is not None:
            self._window.acks.append((publication.row_ids, int(reason.value)))
            self._drain.wake()

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
            violation = self._client.inbound.violation
            if violation is not None:
                self._last_error = f"cut off the cloud broker: {violation}"
                self._counts["peer_violations"] += 1
                self._count_event("cloud_peer_violation")
                log.error("uplink: %s", self._last_error)
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
            while self._transient:
                topic, payload = self._transient.popleft()
                self._client.publish(topic, payload, qos=0)

    def _publish_handed_over(self) -> None:
        window = self._window
        while window.to_publish:
            # Removed only once in inflight, so stop() never sees it in neither.
            publication = window.to_publish[0]
            info = self._client.publish(
                publication.topic, publication.payload, qos=1, properties=publication.properties
            )
            window.inflight[info.mid] = publication
            window.to_publish.popleft()
            self._counts["published"] += len(publication.row_ids)
            self._counts["batches"] += publication.batch

    def _connection_lost(self) -> None:
        window = self._window
        with window.lock:
            window.generation += 1
            self._state = "disconnected"
            for publication in (*window.inflight.values(), *window.to_publish):
                window.lost.extend(publication.row_ids)
            window.inflight.clear()
            window.to_publish.clear()
        # Never let paho resend its copies: the outbox decides what goes out again, and in which order.
        self._client.drop_out_messages()
        self._connected_since = None
        self._drain.wake()

"""One ingest worker: a member of the shared subscription that stores what it receives, then acknowledges it.

Threads: paho's network thread receives messages into a bounded buffer; the worker's ``ingest-commit``
thread takes them out in batches (group commit), has :class:`~provisioning.ingest.store.RecordStore`
verify and store each batch in one transaction, and only then sends the batch's PUBACKs (in arrival order,
as MQTT 5 requires: :class:`agent.mqtt.transport.AckSequencer`).

Nothing is lost on any failure: a message is acknowledged only once its records are committed, so after a
crash, a lost connection or a stop the broker delivers whatever was not acknowledged again (the session is
persistent: a fixed client id, Clean Start off) and ``msg_id`` drops the copies already stored.

Bounded memory. The CONNECT announces a Receive Maximum equal to the buffer size, so the broker never has
more unacknowledged messages out to this worker than the buffer holds, and a Maximum Packet Size. While
the database is down the worker retries its commit with backoff (MQTT 5 does not resend on a live
connection, so the worker must), holds the acknowledgements, and so receives nothing more once the buffer
is full; the broker queues the rest in the session. Were a broker to ignore Receive Maximum, the network
thread blocks on the full buffer and stops reading the socket.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field

from agent.config import CloudBroker
from agent.mqtt.topics import UPSTREAM_PREFIX
from agent.mqtt.transport import (
    AckSequencer,
    backoff_delay,
    configure_broker_access,
    connect_properties,
    new_client,
)
from provisioning.ingest.schema import DATABASE_ERRORS
from provisioning.ingest.store import Incoming, RecordStore, Tally

log = logging.getLogger(__name__)

_REPORT_EVERY_S = 60.0
_RETRY_MIN_S, _RETRY_MAX_S = 0.1, 5.0


class IngestSettings(BaseModel):
    """One worker's connection and batching; ``fleet ingest`` builds it from its options."""

    model_config = ConfigDict(extra="forbid")

    broker: CloudBroker
    client_id: str = Field("fleet-ingest-1", min_length=1, max_length=128, description="fixed: it names the session")
    group: str = Field("fleet-ingest", pattern=r"^[^/+#]+$", description="shared subscription group")
    buffer: int = Field(256, ge=1, le=65535, description="messages received and not yet acknowledged (Receive Maximum)")
    batch_max: int = Field(256, ge=1, description="messages per database transaction")
    sweep_interval_s: float = Field(5.0, gt=0, description="how often held records are checked for their certificate")

    @property
    def topic_filter(self) -> str:
        return f"$share/{self.group}/{UPSTREAM_PREFIX}/+/#"


class WorkerStats(BaseModel):
    """``received``: messages the broker handed over; ``messages``: those committed and acknowledged. Their
    difference is what the worker holds unacknowledged, which Receive Maximum bounds by the buffer size."""

    received: int
    messages: int
    stored: int
    duplicates: int
    held: int
    released: int
    quarantined: dict[str, int]
    database_retries: int
    buffered: int
    connected: bool


class IngestWorker:
    """``start()``, then ``stop()``: one session on the broker, one connection to the database."""

    def __init__(self, settings: IngestSettings, store: RecordStore) -> None:
        self.settings = settings
        self.store = store
        self._buffer: queue.Queue[tuple[Incoming, int | None, int]] = queue.Queue(maxsize=settings.buffer)
        self._client = new_client(settings.client_id, manual_ack=True)
        configure_broker_access(self._client, settings.broker)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._acks = AckSequencer(self._client)
        self._subscribed = threading.Event()
        self._draining = threading.Event()  # stop: take nothing new, store what is buffered
        self._abandon = threading.Event()  # stop while the database is down: give up the buffer
        self._committer = threading.Thread(target=self._run, name="ingest-commit", daemon=True)
        self._lock = threading.Lock()
        self._tally = Tally()
        self._received = 0
        self._messages = 0
        self._retries = 0

    def start(self, timeout: float | None = None) -> None:
        """Connect (retrying in the background while the broker is unreachable) and start committing;
        with ``timeout``, wait that long for the subscription to be in place."""
        broker = self.settings.broker
        properties = connect_properties(broker.session_expiry, self.settings.buffer, broker.max_packet_bytes)
        self._client.connect_async(
            broker.host, broker.port, broker.keepalive, clean_start=False, properties=properties
        )
        self._client.loop_start()
        self._committer.start()
        if timeout is not None and not self._subscribed.wait(timeout):
            raise TimeoutError(f"not subscribed to {broker.host}:{broker.port} within {timeout} s")

    def stop(self, timeout: float = 30.0) -> None:
        """Store and acknowledge what is buffered (for up to ``timeout`` while the database is down), then
        disconnect. Messages received after this are left to the broker, which delivers them again."""
        self._draining.set()
        self._committer.join(timeout)
        if self._committer.is_alive():
            log.error("the database is still unreachable; leaving %d buffered messages to the broker", self._buffer.qsize())
            self._abandon.set()
            self._committer.join(5.0)
        self._client.disconnect()
        self._client.loop_stop()
        log.info("ingest worker %s stopped: %s", self.settings.client_id, self.stats().model_dump())

    def stats(self) -> WorkerStats:
        with self._lock:
            tally = self._tally
            return WorkerStats(
                received=self._received, messages=self._messages, stored=tally.stored, duplicates=tally.duplicates,
                held=tally.held, released=tally.released, quarantined=dict(tally.quarantined),
                database_retries=self._retries, buffered=self._buffer.qsize(), connected=self._client.is_connected(),
            )  # fmt: skip

    # ---- paho's network thread --------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        log.info("connected (session present: %s); subscribing %s", flags.session_present, self.settings.topic_filter)
        client.subscribe(self.settings.topic_filter, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if all(not reason.is_failure for reason in reasons):
            log.info("subscribed to %s as %s", self.settings.topic_filter, self.settings.client_id)
            self._subscribed.set()
        else:
            log.error("broker refused the subscription %s: %s", self.settings.topic_filter, reasons)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        # Message ids of the lost connection must not be acknowledged on the next; those messages come again.
        self._acks.reset()
        self._subscribed.clear()
        if not self._draining.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._draining.is_set():
            return  # unacknowledged: the broker delivers it again to this session
        with self._lock:
            self._received += 1
        properties = getattr(message.properties, "UserProperty", None) or []
        incoming = Incoming(message.topic, bytes(message.payload), dict(properties), time.time())
        mid = message.mid if message.qos > 0 else None
        if mid is not None:
            self._acks.received(mid, message.qos)
        entry = (incoming, mid, self._acks.generation)
        while not self._abandon.is_set():
            try:
                self._buffer.put(entry, timeout=1.0)
                return
            except queue.Full:
                continue  # the database is slow or down: not reading the socket is the point

    # ---- the ingest-commit thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._commit_until_stopped()
        finally:
            self.store.drop_connection()

    def _commit_until_stopped(self) -> None:
        sweep_due = time.monotonic()
        report_due = sweep_due + _REPORT_EVERY_S
        while not self._abandon.is_set():
            batch = self._take()
            if batch:
                tally = self._commit(batch)
                if tally is None:
                    return
                for _, mid, generation in batch:
                    if mid is not None:
                        self._acks.done(mid, generation)
                with self._lock:
                    self._tally.add(tally)
                    self._messages += len(batch)
                if tally.held:
                    sweep_due = time.monotonic()  # the certificate may have come through another worker
            elif self._draining.is_set():
                return
            now = time.monotonic()
            if now >= sweep_due:
                sweep_due = now + self.settings.sweep_interval_s
                self._sweep()
            if now >= report_due:
                report_due = now + _REPORT_EVERY_S
                log.info("ingest worker %s: %s", self.settings.client_id, self.stats().model_dump())

    def _take(self) -> list[tuple[Incoming, int | None, int]]:
        try:
            batch = [self._buffer.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(batch) < self.settings.batch_max:
            try:
                batch.append(self._buffer.get_nowait())
            except queue.Empty:
                break
        return batch

    def _commit(self, batch: list[tuple[Incoming, int | None, int]]) -> Tally | None:
        """Commit the batch, retrying while the database is unreachable; None if the stop gave up on it."""
        attempt = 0
        prepared = None
        while True:
            try:
                if prepared is None:  # verified once, however often the write is retried
                    prepared = self.store.prepare([incoming for incoming, _, _ in batch])
                return self.store.write(prepared)
            except DATABASE_ERRORS as exc:
                with self._lock:
                    self._retries += 1
                if attempt == 0:
                    log.error("cannot commit %d messages, retrying and holding their acknowledgements: %s", len(batch), exc)
                self.store.drop_connection()
            except Exception:  # a bug must not kill the thread that acknowledges: log it, retry with backoff
                log.exception("unexpected error committing %d messages; retrying", len(batch))
            if self._abandon.wait(backoff_delay(attempt, _RETRY_MIN_S, _RETRY_MAX_S)):
                return None
            attempt += 1

    def _sweep(self) -> None:
        try:
            tally = self.store.release_held()
        except DATABASE_ERRORS as exc:
            log.warning("could not check held records: %s", exc)
            self.store.drop_connection()
            return
        if tally.released:
            log.info("released %d held records whose certificate arrived", tally.released)
            with self._lock:
                self._tally.add(tally)

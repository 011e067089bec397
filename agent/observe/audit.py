"""The audit trail: security events, logged and handed to a sink (the outbox's ``audit`` class) upstream.

Events a client can cause at will (a refused response topic, being rate limited) are themselves limited:
at most one per client and kind every ``client_interval_s``; the next one reported carries how many were
suppressed in between. The sink may block (an outbox write waits for its fsync, a signature for the TPM),
so events reach it from a thread of the trail's own through a bounded queue: :meth:`AuditTrail.record`
never blocks the caller, which may be the MQTT network thread. Events that find the queue full are
logged, counted in ``dropped`` and not sent. Throttles are kept for the ``max_tracked`` clients seen
most recently; one forgotten loses its suppressed count (its next event is reported at once).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from agent.compat import UTC
from agent.errors import AgentError
from agent.faults import INTERNAL_ERRORS

log = logging.getLogger(__name__)

AuditKind = Literal[
    "response_topic_refused", "rate_limited", "signing_key_rotated", "model_swapped", "model_removed", "model_refused",
    "outbox_corrupt",
    "delegation_certificate",
]
# What a client can trigger as often as it likes: throttled per client.
CLIENT_CAUSED: frozenset[AuditKind] = frozenset({"response_topic_refused", "rate_limited"})
_LOG_LEVEL: dict[AuditKind, int] = {
    "response_topic_refused": logging.WARNING,
    "rate_limited": logging.WARNING,
    "signing_key_rotated": logging.INFO,
    "model_swapped": logging.INFO,
    "model_removed": logging.INFO,
    "model_refused": logging.ERROR,
    "outbox_corrupt": logging.ERROR,
    "delegation_certificate": logging.INFO,
}


class AuditEvent(BaseModel):
    """One security event as logged and sent upstream."""

    kind: AuditKind
    at: datetime
    device_id: str
    client_id: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    suppressed: int = Field(0, description="like events from this client not reported since the last one")


@dataclass(slots=True)
class _Throttle:
    last_reported: float
    suppressed: int = 0


_STOP = object()


class AuditTrail:
    """Records security events; ``sink`` (called on the trail's own thread) sends each one upstream."""

    def __init__(
        self,
        device_id: str,
        sink: Callable[[AuditEvent], None] | None,
        *,
        client_interval_s: float = 60.0,
        max_tracked: int = 1024,
        queue_size: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self.client_interval_s = client_interval_s
        self.max_tracked = max_tracked
        self.dropped = 0
        self._sink = sink
        self._clock = clock
        self._throttles: OrderedDict[tuple[AuditKind, str], _Throttle] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def tracked(self) -> int:
        """(kind, client) pairs whose throttle is remembered."""
        return len(self._throttles)

    def record(self, kind: AuditKind, *, client_id: str | None = None, **detail: Any) -> AuditEvent | None:
        """Log the event and queue it for the sink; returns it, or None when throttled."""
        suppressed = 0
        if kind in CLIENT_CAUSED and client_id is not None:
            admitted = self._admit(kind, client_id)
            if admitted is None:
                return None
            suppressed = admitted
        event = AuditEvent(
            kind=kind, at=datetime.now(UTC), device_id=self.device_id, client_id=client_id, detail=detail,
            suppressed=suppressed,
        )  # fmt: skip
        about = f" client {client_id}" if client_id is not None else ""
        extra = f" ({suppressed} more suppressed)" if suppressed else ""
        dumped = event.model_dump(mode="json")
        log.log(_LOG_LEVEL[kind], "audit: %s%s %s%s", kind, about, detail, extra, extra={"audit": dumped})
        if self._sink is not None and self._deliverer_running():
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                self.dropped += 1
                log.error("audit: queue full, %s event not sent upstream (%d dropped so far)", kind, self.dropped)
        return event

    def close(self, timeout: float = 10.0) -> None:
        """Hand the queued events to the sink and stop its thread; later events are only logged."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error("audit: the sink is stuck; %d queued event(s) not sent upstream", self._queue.qsize())
            return
        thread.join(timeout)

    def _deliverer_running(self) -> bool:
        """Start the sink's thread with the first event (an agent that never sees one never has it)."""
        with self._lock:
            if self._closed:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver, name="audit-sink", daemon=True)
                self._thread.start()
            return True

    def _admit(self, kind: AuditKind, client_id: str) -> int | None:
        """Suppressed count to report if this event may go out now, or None to suppress it."""
        key = (kind, client_id)
        now = self._clock()
        with self._lock:
            throttle = self._throttles.get(key)
            if throttle is None:
                self._throttles[key] = _Throttle(now)
                if len(self._throttles) > self.max_tracked:
                    self._throttles.popitem(last=False)
                return 0
            self._throttles.move_to_end(key)
            if now - throttle.last_reported < self.client_interval_s:
                throttle.suppressed += 1
                return None
            suppressed, throttle.suppressed, throttle.last_reported = throttle.suppressed, 0, now
            return suppressed

    def _deliver(self) -> None:
        assert self._sink is not None
        while True:
            event = self._queue.get()
            if event is _STOP:
                return
            assert isinstance(event, AuditEvent)
            try:
                self._sink(event)
            except AgentError as exc:
                log.error("audit: %s event not sent upstream: %s", event.kind, exc)
            except Exception as exc:  # a failing sink must cost one event, never the trail
                INTERNAL_ERRORS.record("audit_sink", exc)

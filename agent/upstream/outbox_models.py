"""What the outbox hands out: claimed rows for the uplink, and the rows and totals operators read."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from agent.config import MessageClass

T = TypeVar("T")
# Operators' figures and corruption reports are first needed long after start (a health report, a scrape,
# `edge-agent outbox status`): their validators are built then, not on the way to online.
_BUILT_ON_FIRST_USE = ConfigDict(defer_build=True)


class OutboxRecord(BaseModel):
    """A claimed row, as the uplink publishes it."""

    id: int
    msg_id: str
    cls: MessageClass
    body: bytes
    enqueued_wall: float
    age_s: float
    remaining_ttl_s: float | None
    attempts: int


class OutboxEntry(BaseModel):
    """A row as ``peek`` shows it to an operator."""

    model_config = _BUILT_ON_FIRST_USE

    id: int
    msg_id: str
    cls: MessageClass
    state: str
    size: int
    attempts: int
    failures: int
    last_reason: int | None
    age_s: float
    expires_in_s: float | None
    enqueued_at: datetime
    preview: str


class ClassStats(BaseModel):
    model_config = _BUILT_ON_FIRST_USE

    queued: int = 0
    claimed: int = 0
    dead: int = 0
    bytes: int = 0
    oldest_age_s: float | None = None


class CorruptionEvent(BaseModel):
    model_config = _BUILT_ON_FIRST_USE

    at: datetime
    moved_to: str
    rows_salvaged: int
    cause: str


class OutboxStats(BaseModel):
    model_config = _BUILT_ON_FIRST_USE

    path: str
    schema_version: int
    messages: int
    bytes: int
    max_messages: int
    max_bytes: int
    classes: dict[MessageClass, ClassStats]
    oldest_age_s: float | None
    dead: int
    drops: dict[str, dict[str, int]] = Field(description="reason -> class -> messages dropped, ever")
    dead_lettered: dict[str, int] = Field(description="class -> refusals by the cloud, ever")
    delivered: int
    last_delivery_at: datetime | None
    corruption_events: int
    last_corruption: CorruptionEvent | None
    transactions: int = Field(description="write transactions (fsyncs) committed since this process opened it")
    write_errors: int = Field(description="write transactions failed since this process opened the outbox")
    problem: str | None = Field(
        None, description="why new messages cannot be stored now (disk full, the file cannot be opened); None: they can"
    )


class Listeners(Generic[T]):
    """Callbacks for an outbox event, run on the thread that reports it (the writer's: they must not block).

    One that raises is logged and the others still run. ``replay``: a callback added later is first called
    with every event reported before (the outbox reports some while it opens, before anyone could listen).
    """

    def __init__(self, *, replay: bool = False) -> None:
        self._callbacks: list[Callable[[T], None]] = []
        self._past: list[T] | None = [] if replay else None
        self._lock = threading.Lock()

    def add(self, callback: Callable[[T], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)
            past = list(self._past or [])
        for event in past:
            self._call(callback, event)

    def notify(self, event: T) -> None:
        with self._lock:
            if self._past is not None:
                self._past.append(event)
            callbacks = list(self._callbacks)
        for callback in callbacks:
            self._call(callback, event)

    @staticmethod
    def _call(callback: Callable[[T], None], event: T) -> None:
        try:
            callback(event)
        except Exception:
            logging.getLogger("agent.upstream.outbox").exception("outbox listener failed")

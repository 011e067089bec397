"""What the outbox hands out: claimed rows for the uplink, and the rows and totals operators read."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from agent.config import MessageClass


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
    queued: int = 0
    claimed: int = 0
    dead: int = 0
    bytes: int = 0
    oldest_age_s: float | None = None


class CorruptionEvent(BaseModel):
    at: datetime
    moved_to: str
    rows_salvaged: int
    cause: str


class OutboxStats(BaseModel):
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

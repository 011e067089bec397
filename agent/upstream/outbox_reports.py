"""What an operator reads from an open outbox: its totals (``stats``) and its oldest rows (``peek``).

Runs on the outbox's writer thread, like every other access to the ledger's connection.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import peewee

from agent.compat import UTC
from agent.config import MESSAGE_CLASSES, OutboxSettings
from agent.upstream.outbox_file import CLAIMED, QUEUED, body_size
from agent.upstream.outbox_ledger import Ledger
from agent.upstream.outbox_models import ClassStats, CorruptionEvent, OutboxEntry, OutboxStats


def clock_shift(ledger: Ledger) -> float:
    """0 for the writer (rebased at open); for a reader in a later boot, the shift the writer will apply."""
    if not ledger.read_only:
        return 0.0
    meta = {m.key: m.value for m in ledger.tables.meta.select()}
    if meta.get("boot_id") != ledger.clock.boot_id() and "boot_clock" in meta:
        return ledger.clock.now() - float(meta["boot_clock"])
    return 0.0


def stats(ledger: Ledger, *, transactions: int, write_errors: int, problem: str | None = None) -> OutboxStats:
    """Totals per class and state, drops, dead letters and faults, read from the file."""
    tables, row = ledger.tables, ledger.tables.row
    now = ledger.clock.now() - clock_shift(ledger)
    classes = {cls: ClassStats() for cls in MESSAGE_CLASSES}
    query = row.select(
        row.cls, row.state, peewee.fn.COUNT(row.id), peewee.fn.SUM(body_size(row)), peewee.fn.MIN(row.enqueued_clock)
    ).group_by(row.cls, row.state)
    for cls, state, count, size, oldest in query.tuples():
        entry = classes.setdefault(cls, ClassStats())
        setattr(entry, state, count)
        entry.bytes += size or 0
        age = max(0.0, now - oldest)
        entry.oldest_age_s = age if entry.oldest_age_s is None else max(entry.oldest_age_s, age)
    for cls, _ in ledger.held.rows.values():  # claimed, though the file still says queued
        classes[cls].queued -= 1
        classes[cls].claimed += 1
    counters = {c.name: c.value for c in tables.counter.select()}
    meta = {m.key: m.value for m in tables.meta.select()}
    drops: dict[str, dict[str, int]] = {}
    for name, value in counters.items():
        if name.startswith("drop:"):
            _, reason, cls = name.split(":", 2)
            drops.setdefault(reason, {})[cls] = value
    ages = [c.oldest_age_s for c in classes.values() if c.oldest_age_s is not None]
    last_delivery = meta.get("last_delivery_wall")
    corruption = meta.get("last_corruption")
    return OutboxStats(
        path=str(ledger.path),
        schema_version=ledger.schema_version,
        messages=sum(c.queued + c.claimed + c.dead for c in classes.values()),
        bytes=sum(c.bytes for c in classes.values()),
        max_messages=ledger.settings.max_messages,
        max_bytes=ledger.settings.max_bytes,
        classes=classes,
        oldest_age_s=max(ages) if ages else None,
        dead=sum(c.dead for c in classes.values()),
        drops=drops,
        dead_lettered={n.split(":", 1)[1]: v for n, v in counters.items() if n.startswith("dead_lettered:")},
        delivered=counters.get("delivered", 0),
        last_delivery_at=datetime.fromtimestamp(float(last_delivery), UTC) if last_delivery else None,
        corruption_events=counters.get("corruption_events", 0),
        last_corruption=CorruptionEvent.model_validate_json(corruption) if corruption else None,
        transactions=transactions,
        write_errors=write_errors,
        problem=problem,
    )


def unavailable(path: Path, settings: OutboxSettings, problem: str, *, write_errors: int) -> OutboxStats:
    """What an outbox that could not be opened reports: nothing stored readable, and why."""
    return OutboxStats(
        path=str(path),
        schema_version=0,
        messages=0,
        bytes=0,
        max_messages=settings.max_messages,
        max_bytes=settings.max_bytes,
        classes={cls: ClassStats() for cls in MESSAGE_CLASSES},
        oldest_age_s=None,
        dead=0,
        drops={},
        dead_lettered={},
        delivered=0,
        last_delivery_at=None,
        corruption_events=0,
        last_corruption=None,
        transactions=0,
        write_errors=write_errors,
        problem=problem,
    )


def peek(ledger: Ledger, n: int, cls: str | None, state: str | None) -> list[OutboxEntry]:
    """The ``n`` oldest rows, optionally of one class and/or state."""
    row = ledger.tables.row
    now = ledger.clock.now() - clock_shift(ledger)
    query = row.select()
    if cls is not None:
        query = query.where(row.cls == cls)
    held = list(ledger.held.rows)  # claimed, though the file still says queued
    if state == CLAIMED and held:
        query = query.where((row.state == state) | row.id.in_(held))
    elif state == QUEUED and held:
        query = query.where((row.state == state) & row.id.not_in(held))
    elif state is not None:
        query = query.where(row.state == state)
    return [
        OutboxEntry(
            id=r.id,
            msg_id=r.msg_id,
            cls=r.cls,
            state=CLAIMED if r.id in ledger.held.rows else r.state,
            size=len(r.body),
            attempts=r.attempts,
            failures=r.failures,
            last_reason=r.last_reason,
            age_s=max(0.0, now - r.enqueued_clock),
            expires_in_s=None if r.expires_clock is None else r.expires_clock - now,
            enqueued_at=datetime.fromtimestamp(r.enqueued_wall, UTC),
            preview=bytes(r.body[:200]).decode("utf-8", "replace"),
        )
        for r in query.order_by(row.id).limit(max(0, n))
    ]

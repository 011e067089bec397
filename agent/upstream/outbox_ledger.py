"""The outbox's rows and what may happen to them: claim, deliver, dead-letter, evict, expire, with running
totals kept in step. Every method runs on the outbox's writer thread inside the batch's transaction; the
policies themselves are documented in :mod:`agent.upstream.outbox`, what operators read of the rows is
:mod:`agent.upstream.outbox_reports`."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import peewee

from agent.config import MessageClass, OutboxSettings
from agent.upstream import outbox_file as store
from agent.upstream.outbox_fresh import Claimable, FreshRows, HeldClaims
from agent.upstream.outbox_models import OutboxRecord
from agent.upstream.outbox_sql import INSERT, INSERT_ROW, insert_sizes, padded_chunks, placeholders

log = logging.getLogger("agent.upstream.outbox")

EVICTION_ORDER: tuple[MessageClass, ...] = ("telemetry", "fallback", "res", "deploy", "audit")
SEND_ORDER: tuple[MessageClass, ...] = ("fallback", "deploy", "res", "audit", "telemetry")
_HEARTBEAT_S = 1.0
_EVICTION_CHUNK = 256
Row = tuple[int, str, int, str]  # id, cls, size, state
# The hot statements (claim, deliver) are plain SQL: building them through Peewee's query builder cost
# more CPU than SQLite spent running them.
_CLAIM_SELECT = (
    "SELECT id, msg_id, cls, body, enqueued_wall, enqueued_clock, expires_clock, attempts FROM outbox "
    "WHERE state = 'queued' AND cls = ? ORDER BY id LIMIT ?"
)
_EARLIEST_EXPIRY = "SELECT MIN(expires_clock) FROM outbox WHERE state != 'claimed'"
_ADD_TO_COUNTER = (
    "INSERT INTO counter (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"
)


class Ledger:
    """Operations on one open outbox file, plus the totals the bounds are enforced against."""

    def __init__(
        self,
        db: peewee.SqliteDatabase,
        settings: OutboxSettings,
        clock: store.OutboxClock,
        *,
        path: Path,
        schema_version: int,
        read_only: bool,
    ) -> None:
        self.db = db
        self.tables = store.bind_tables(db)
        self.settings = settings
        self.clock = clock
        self.path = path
        self.schema_version = schema_version
        self.read_only = read_only
        self.count = self.bytes = 0
        self.in_flight = self.in_flight_bytes = 0
        self.queued: Counter[str] = Counter()
        self.next_retry: float | None = None
        # No unclaimed row expires before this boot-clock time (-inf: unknown, scan at the next chance),
        # so a claim runs the expiry scan only when something may really have expired.
        self.next_expiry = float("-inf")
        self.queued_classes: set[str] = set()  # classes whose queued rows grew in this transaction
        self._fresh = FreshRows()  # what a claim takes without reading it back (see outbox_fresh)
        self.held = HeldClaims()  # ... and claims without marking it in the file
        self._pending: Counter[str] = Counter()
        self._dirty = False
        self._last_heartbeat = float("-inf")
        self._last_drop_log = float("-inf")

    # -- transaction frame --------------------------------------------------------------------------

    def begin(self) -> None:
        self._pending.clear()
        self.held.begin()
        self._dirty = False
        self.queued_classes = set()

    def finish(self, *, force_heartbeat: bool) -> set[int]:
        """Enforce the bounds and persist counters; returns the ids evicted in this transaction."""
        evicted = self._enforce_bounds() if self._over_bounds() else set()
        for name, delta in self._pending.items():
            self.db.execute_sql(_ADD_TO_COUNTER, (name, delta))
        now = self.clock.now()
        if force_heartbeat or (self._dirty and now - self._last_heartbeat >= _HEARTBEAT_S):
            store.write_meta(self.tables, boot_clock=repr(now))
            self._last_heartbeat = now
        return evicted

    def load_accounting(self) -> None:
        """Recompute the running totals from the file (at open and after a failed transaction)."""
        self._fresh.forget()  # first: rows remembered in a transaction that failed were never stored
        self.held.rollback()
        row = self.tables.row
        self.count = self.bytes = self.in_flight = self.in_flight_bytes = 0
        self.queued = Counter()
        totals = (row.cls, row.state, peewee.fn.COUNT(row.id), peewee.fn.SUM(store.body_size(row)))
        query = row.select(*totals).group_by(row.cls, row.state)
        for cls, state, count, size in query.tuples():
            self.count += count
            self.bytes += size or 0
            if state == store.QUEUED:
                self.queued[cls] += count
            elif state == store.CLAIMED:
                self.in_flight += count
                self.in_flight_bytes += size or 0
        for cls, size in self.held.rows.values():  # queued in the file, claimed in fact
            self.queued[cls] -= 1
            self.in_flight += 1
            self.in_flight_bytes += size
        self.next_retry = self._earliest_retry()
        self.next_expiry = float("-inf")

    def release_all_claims_at_open(self) -> None:
        store.rebase_clock(self.tables, self.clock)
        row = self.tables.row
        row.update(state=store.QUEUED).where(row.state == store.CLAIMED).execute()

    # -- operations ---------------------------------------------------------------------------------

    def maintain(self) -> None:
        now = self.clock.now()
        self._promote_due(now)
        self._expire(now)

    def enqueue(self, rows: list[tuple[str, bytes, float | None, str]]) -> list[int | None]:
        """Insert ``rows`` (class, body, ttl, msg_id); their ids in order, None for a row refused as too large.

        One multi-row ``INSERT`` per ``ROWS_PER_INSERT`` rows: every step of a statement releases the GIL
        (``executemany`` steps once per row), and under request load taking it back waits up to a switch
        interval behind the request threads, for each step: that wait, not SQLite, was most of a commit's
        time under a flood. Inside this transaction nothing else writes, so AUTOINCREMENT gives the rows
        consecutive ids, in VALUES order, ending at the cursor's ``lastrowid``.
        """
        now, wall = self.clock.now(), self.clock.wall()
        values = []
        fits: list[bool] = []
        for cls, body, ttl, msg_id in rows:
            size = len(body)
            fits.append(size <= self.settings.max_bytes)
            if not fits[-1]:
                self._drop("too_large", cls, 1)
                continue
            expires = now + ttl if ttl else None
            if expires is not None and expires < self.next_expiry:
                self.next_expiry = expires
            values.append((msg_id, cls, body, size, wall, now, expires))
            self.count += 1
            self.bytes += size
            self.queued[cls] += 1
        self._dirty = True
        self.queued_classes.update(row[1] for row in values)
        if not values:
            return [None] * len(rows)
        cursor = self.db.connection().cursor()
        start = 0
        for size in insert_sizes(len(values)):
            chunk = values[start : start + size]
            start += size
            cursor.execute(INSERT + ", ".join([INSERT_ROW] * size), [value for row in chunk for value in row])
        first_id = next_id = cursor.lastrowid - len(values) + 1
        ids: list[int | None] = []
        for fit in fits:
            ids.append(next_id if fit else None)
            next_id += fit
        self._fresh.remember(values, first_id)
        return ids

    def claim(self, limit: int) -> list[OutboxRecord]:
        now = self.clock.now()
        self._promote_due(now)
        if not any(self.queued.values()):
            self._fresh.empty(SEND_ORDER)
            return []
        if now >= self.next_expiry:
            self._expire(now)
        found: list[Claimable] = []
        marked: list[int] = []  # rows read from the file: marked claimed there (fresh ones are held instead)
        for cls in SEND_ORDER:
            if len(found) >= limit:
                break
            if self.queued[cls] <= 0:
                self._fresh.empty((cls,))
                continue
            wanted = limit - len(found)
            rows = self._fresh.take(cls, wanted, self.queued[cls])
            if rows is not None:
                for row in rows:
                    self.held.add(row[0], cls, len(row[3]))
            else:
                # Held rows are queued in the file, and the oldest: read past them.
                held = self.held.of_class(cls)
                read = self.db.execute_sql(_CLAIM_SELECT, (cls, wanted + held)).fetchall()
                rows = [r for r in read if r[0] not in self.held.rows][:wanted]
                if len(read) < wanted + held:
                    self._fresh.empty((cls,))
                marked += [r[0] for r in rows]
            found += rows
        for chunk in padded_chunks(marked):
            self.db.execute_sql(
                f"UPDATE outbox SET state = 'claimed', attempts = attempts + 1 WHERE id IN ({placeholders(chunk)})",
                chunk,
            )
        self._dirty = self._dirty or bool(marked)
        claimed: list[OutboxRecord] = []
        for row_id, msg_id, cls, body, enqueued_wall, enqueued_clock, expires_clock, attempts in found:
            self.queued[cls] -= 1
            self.in_flight += 1
            self.in_flight_bytes += len(body)
            claimed.append(
                OutboxRecord(
                    id=row_id,
                    msg_id=msg_id,
                    cls=cls,
                    body=bytes(body),
                    enqueued_wall=enqueued_wall,
                    age_s=max(0.0, now - enqueued_clock),
                    remaining_ttl_s=None if expires_clock is None else expires_clock - now,
                    attempts=attempts + 1,
                )
            )
        return claimed

    def delivered(self, ids: list[int]) -> int:
        deleted = self._delete(self._by_ids(ids))
        if deleted:
            self._pending["delivered"] += len(deleted)
            store.write_meta(self.tables, last_delivery_wall=repr(self.clock.wall()))
        return len(deleted)

    def failed(self, failures: list[tuple[int, int]]) -> None:
        row, settings, now = self.tables.row, self.settings, self.clock.now()
        for row_id, reason in failures:
            current = row.get_or_none(row.id == row_id)
            held = row_id in self.held.rows
            if current is None or (current.state != store.CLAIMED and not held):
                continue
            self.held.discard((row_id,))
            size = len(current.body)
            refusals = current.failures + 1
            retry_at = None
            if refusals < settings.dead_letter_max_attempts:
                delay = min(settings.dead_letter_retry_s * 2 ** (refusals - 1), settings.dead_letter_retry_max_s)
                retry_at = now + delay
                self.next_retry = retry_at if self.next_retry is None else min(self.next_retry, retry_at)
            attempts = {"attempts": row.attempts + 1} if held else {}  # the claim it was held for
            self._set_state(
                [row_id], store.DEAD, failures=refusals, last_reason=reason, retry_clock=retry_at, **attempts
            )
            self.in_flight -= 1
            self.in_flight_bytes -= size
            self._pending[f"dead_lettered:{current.cls}"] += 1
            log.warning("outbox: cloud refused %s (%s) with reason 0x%02x", current.msg_id, current.cls, reason)

    def release(self, ids: list[int] | None) -> int:
        if ids is not None:
            return self._requeue([r for r in self._by_ids(ids) if r[3] == store.CLAIMED])
        held = [(i, cls, size, store.CLAIMED) for i, (cls, size) in self.held.rows.items()]
        return self._requeue(sorted(self._select_rows(self.tables.row.state == store.CLAIMED) + held))

    def retry_dead(self, ids: list[int] | None) -> int:
        row = self.tables.row
        dead = row.state == store.DEAD
        rows = self._select_rows(dead) if ids is None else self._by_ids(ids, dead)
        return self._requeue(rows, failures=0, retry_clock=None)

    # -- internals ----------------------------------------------------------------------------------

    def _over_bounds(self) -> bool:
        # Rows in flight do not count: they leave on their PUBACK, and must not push new messages out.
        return (
            self.count - self.in_flight > self.settings.max_messages
            or self.bytes - self.in_flight_bytes > self.settings.max_bytes
        )

    def _drop(self, reason: str, cls: str, count: int) -> None:
        if not count:
            return
        self._pending[f"drop:{reason}:{cls}"] += count
        # Once a minute at most: a store that is full for days must not also fill the log.
        now = time.monotonic()
        if now - self._last_drop_log >= 60:
            self._last_drop_log = now
            log.warning("outbox dropping messages (%d %s: %s); totals are in `outbox status`", count, cls, reason)

    def _enforce_bounds(self) -> set[int]:
        evicted = self._expire(self.clock.now())
        row = self.tables.row
        for cls in EVICTION_ORDER:
            while self._over_bounds():
                limit = _EVICTION_CHUNK + len(self.held.rows)
                queued = self._select_rows(row.state == store.QUEUED, row.cls == cls, limit=limit)
                candidates = sorted(
                    [r for r in queued if r[3] == store.QUEUED]  # never a held row: it is in flight
                    + self._select_rows(row.state == store.DEAD, row.cls == cls, limit=_EVICTION_CHUNK)
                )[:_EVICTION_CHUNK]
                count, size = self.count - self.in_flight, self.bytes - self.in_flight_bytes
                victims = []
                for candidate in candidates:
                    if count <= self.settings.max_messages and size <= self.settings.max_bytes:
                        break
                    victims.append(candidate)
                    count, size = count - 1, size - candidate[2]
                if not victims:
                    break
                evicted |= self._delete(victims)
                self._drop("capacity", cls, len(victims))
        return evicted

    def _expire(self, now: float) -> set[int]:
        row = self.tables.row
        expired = [r for r in self._select_rows(row.expires_clock <= now) if r[3] != store.CLAIMED]
        for cls, count in Counter(r[1] for r in expired).items():
            self._drop("expired", cls, count)
        deleted = self._delete(expired)
        earliest = self.db.execute_sql(_EARLIEST_EXPIRY).fetchone()[0]
        self.next_expiry = float("inf") if earliest is None else earliest
        return deleted

    def _promote_due(self, now: float) -> None:
        if self.next_retry is None or now < self.next_retry:
            return
        row = self.tables.row
        due = self._select_rows(row.state == store.DEAD, row.retry_clock <= now)
        self._requeue(due)
        self.next_retry = self._earliest_retry()

    def _earliest_retry(self) -> float | None:
        row = self.tables.row
        return row.select(peewee.fn.MIN(row.retry_clock)).where(row.state == store.DEAD).scalar()

    def _requeue(self, rows: list[Row], **extra: Any) -> int:
        self._fresh.forget(r[1] for r in rows)  # requeued rows are older than the fresh ones
        held = [r[0] for r in rows if r[0] in self.held.rows]
        self._set_state([r[0] for r in rows if r[0] not in self.held.rows], store.QUEUED, **extra)
        self._set_state(held, store.QUEUED, attempts=self.tables.row.attempts + 1)  # the claim it was held for
        self.held.discard(held)
        if rows:
            self.next_expiry = float("-inf")  # requeued rows may expire before any other unclaimed row
        self.queued.update(r[1] for r in rows)
        for _, _, size, state in rows:
            if state == store.CLAIMED:
                self.in_flight -= 1
                self.in_flight_bytes -= size
        self.queued_classes.update(r[1] for r in rows)
        return len(rows)

    def _set_state(self, ids: Sequence[int], state: str, **extra: Any) -> None:
        row = self.tables.row
        for chunk in padded_chunks(ids):
            row.update(state=state, **extra).where(row.id.in_(chunk)).execute()
        self._dirty = self._dirty or bool(ids)

    def _delete(self, rows: Sequence[Row]) -> set[int]:
        self._fresh.forget(r[1] for r in rows if r[3] == store.QUEUED)
        ids = [r[0] for r in rows]
        for chunk in padded_chunks(ids):
            self.db.execute_sql(f"DELETE FROM outbox WHERE id IN ({placeholders(chunk)})", chunk)
        for _, cls, size, state in rows:
            self.count -= 1
            self.bytes -= size
            if state == store.QUEUED:
                self.queued[cls] -= 1
            elif state == store.CLAIMED:
                self.in_flight -= 1
                self.in_flight_bytes -= size
        self.held.discard(ids)
        self._dirty = self._dirty or bool(rows)
        return set(ids)

    def _select_rows(self, *conditions: Any, limit: int | None = None) -> list[Row]:
        row = self.tables.row
        query = row.select(row.id, row.cls, store.body_size(row), row.state).where(*conditions).order_by(row.id)
        return self.held.mark(list((query.limit(limit) if limit else query).tuples()), store.CLAIMED)

    def _by_ids(self, ids: Sequence[int], *conditions: Any) -> list[Row]:
        found: list[Row] = []
        for chunk in padded_chunks(ids):
            if conditions:
                found += self._select_rows(self.tables.row.id.in_(chunk), *conditions)
            else:
                found += self.held.mark(
                    self.db.execute_sql(
                        f"SELECT id, cls, length(body), state FROM outbox WHERE id IN ({placeholders(chunk)}) ORDER BY id",
                        chunk,
                    ).fetchall(),
                    store.CLAIMED,
                )
        return found

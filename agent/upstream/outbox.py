"""The durable outbox: every message the device owes the cloud, on disk before anyone relies on it.

What callers can rely on:

* **Durable on return.** ``enqueue`` returns only once its row is committed with ``synchronous=FULL`` in
  WAL mode (fsynced). One writer thread folds every write waiting at that moment (up to ``batch_max``) into
  one transaction and one fsync (group commit), so many request threads share the cost.
* **Never deleted on dequeue.** ``claim_batch`` marks rows *claimed*; only ``mark_delivered`` (a PUBACK
  below 0x80) deletes them. Claims do not survive the process: at open, and on ``release_claims``, claimed
  rows are *queued* again and resent (at-least-once; the stable ``msg_id`` lets the cloud drop repeats).
  Since a claim is undone at open anyway, a batch holding only claims/releases commits without its own
  fsync (``synchronous=NORMAL``, under which WAL checkpoints are still synced); the drain thus pays one
  fsync per window of acknowledgements, not two.
* **Order.** Row ids come from ``AUTOINCREMENT`` (never reused, never from a clock). Within a class,
  ``claim_batch`` hands rows out oldest id first, including rows released back after a disconnect or crash.
  Across classes it serves ``fallback``, ``res``, ``audit``, then ``telemetry``, so a telemetry backlog
  never delays a deadline-bound fallback request.
* **Dead letters.** ``mark_failed`` (a PUBACK of 0x80 or more) parks a row as *dead*. It is queued again
  after ``dead_letter_retry_s``, doubling per refusal up to ``dead_letter_retry_max_s``; after
  ``dead_letter_max_attempts`` refusals it stays dead (counted, visible in ``peek``) until ``retry_dead``
  or until capacity or TTL removes it. A retried row is sent after rows that overtook it: it keeps its
  ``msg_id`` and id (``seq`` upstream) so the cloud can put it back in place.
* **Bounds.** When ``max_messages`` or ``max_bytes`` (sum of bodies) would be exceeded, expired rows go
  first, then the oldest unclaimed rows of ``telemetry``, ``fallback``, ``res`` and finally ``audit``. A new
  message can be the one that goes (e.g. telemetry into a store full of audit records): its ``enqueue``
  raises :class:`OutboxError`. A body larger than ``max_bytes`` is refused. Rows in flight (claimed, at
  most the uplink's window) are never evicted and do not count against the bounds. Every drop is counted
  by reason (``capacity``, ``expired``, ``too_large``) and class.
* **TTL** per class (``ttl_s``) or per message, measured on the boot clock (see :mod:`agent.upstream.outbox_file`):
  a wall-clock jump never expires anything early.
* **Faults.** A corrupt file is salvaged as far as SQLite can read it, moved aside with its -wal/-shm under
  a timestamped name (kept), and replaced by a fresh file holding the salvaged rows; logged at ERROR and
  counted in ``stats``. Disk full (or ``max_file_bytes``) fails the writes of that transaction with a clear
  :class:`OutboxError`; stored rows are untouched and writing resumes once space returns.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import uuid6
from pydantic import BaseModel, Field, PositiveFloat, ValidationInfo, field_validator

from agent.compat import SQLITE_FULL, UTC
from agent.config import MessageClass, OutboxSettings
from agent.errors import OutboxError
from agent.faults import HEARTBEATS, INTERNAL_ERRORS
from agent.upstream import outbox_file as store
from agent.upstream.outbox_ledger import (
    EVICTION_ORDER,
    SEND_ORDER,
    ClassStats,
    CorruptionEvent,
    Ledger,
    OutboxEntry,
    OutboxRecord,
    OutboxStats,
)

__all__ = [
    "EVICTION_ORDER",
    "SEND_ORDER",
    "ClassStats",
    "CorruptionEvent",
    "Outbox",
    "OutboxEntry",
    "OutboxItem",
    "OutboxRecord",
    "OutboxStats",
]

log = logging.getLogger(__name__)

_MAINTENANCE_S = 30.0
_READ_OPS = frozenset({"stats", "peek"})
# Claims need no fsync of their own: every claim is undone at open anyway, and the next durable commit
# syncs the WAL they were written to.
_UNSYNCED_OPS = frozenset({"claim", "release"})


# Validation context for bodies the agent just produced with a JSON encoder: parsing a signed 82 KB reply
# again only to learn that it is JSON costs more than storing it.
ENCODED_BY_AGENT = "encoded_by_agent"


class OutboxItem(BaseModel):
    """One message to store: ``body`` is a UTF-8 JSON document, embedded as-is in the upstream envelope."""

    cls: MessageClass
    body: bytes
    ttl_s: PositiveFloat | None = None
    msg_id: str | None = Field(None, min_length=1, max_length=64)

    @field_validator("body")
    @classmethod
    def _body_is_json(cls, value: bytes, info: ValidationInfo) -> bytes:
        if not (info.context or {}).get(ENCODED_BY_AGENT):
            json.loads(value)
        return value


@dataclass
class _Command:
    op: str
    args: tuple[Any, ...]
    future: Future[Any] = field(default_factory=Future)

    @property
    def read(self) -> bool:
        return self.op in _READ_OPS


_STOP = _Command("stop", ())


class Outbox:
    """The store at ``path`` (a file in ``data_dir``); one writer process at a time (a lock file enforces it).

    ``read_only=True`` opens a running agent's outbox for ``stats``/``peek`` without touching it.
    """

    def __init__(
        self,
        path: Path,
        settings: OutboxSettings | None = None,
        *,
        read_only: bool = False,
        clock: store.OutboxClock | None = None,
    ) -> None:
        self.path = Path(path)
        self.settings = settings or OutboxSettings()
        self.read_only = read_only
        self._clock = clock or store.OutboxClock()
        self._queue: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._submit_lock = threading.Lock()
        self._closed = False
        self._listeners: list[Callable[[], None]] = []
        self._lock_fd: int | None = None
        self._ledger: Ledger | None = None
        self._transactions = self._write_errors = 0
        self._failing = False
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="outbox-writer", daemon=True)
        self._thread.start()
        ready.result()

    # -- public API ---------------------------------------------------------------------------------

    def enqueue(self, cls: MessageClass, body: bytes, *, ttl_s: float | None = None, msg_id: str | None = None) -> str:
        """Store one message durably and return its msg_id (UUIDv7 unless given)."""
        return self.enqueue_many([OutboxItem(cls=cls, body=body, ttl_s=ttl_s, msg_id=msg_id)])[0]

    def enqueue_many(self, items: Sequence[OutboxItem]) -> list[str]:
        """Store messages durably in one transaction; returns their msg_ids in order.

        Raises :class:`OutboxError` if any could not be stored; the others stay stored.
        """
        return self.enqueue_async(items).result()

    def enqueue_async(self, items: Sequence[OutboxItem]) -> Future[list[str]]:
        """Like :meth:`enqueue_many` without waiting: the future resolves once the messages are durable.

        Lets a caller hand its row to the group commit and go on working; the future's callbacks run on the
        writer thread right after the commit (keep them short), or at once if it already completed.
        """
        rows = []
        for item in items:
            ttl = item.ttl_s if item.ttl_s is not None else self.settings.ttl_s.get(item.cls)
            rows.append((item.cls, item.body, ttl, item.msg_id or str(uuid6.uuid7())))
        stored: Future[list[str]] = Future()

        def settle(outcome: Future[list[int | None]]) -> None:
            error = outcome.exception()
            if error is not None:
                stored.set_exception(error)
                return
            refused = [row[3] for row, row_id in zip(rows, outcome.result()) if row_id is None]
            if refused:
                stored.set_exception(
                    OutboxError(
                        f"outbox {self.path}: {len(refused)} of {len(rows)} message(s) not stored, no room under "
                        f"max_bytes={self.settings.max_bytes}/max_messages={self.settings.max_messages} "
                        f"for their class: {', '.join(refused[:5])}"
                    )
                )
            else:
                stored.set_result([row[3] for row in rows])

        try:
            self._submit_nowait("enqueue", rows).add_done_callback(settle)
        except OutboxError as exc:
            stored.set_exception(exc)
        return stored

    def claim_batch(self, limit: int) -> list[OutboxRecord]:
        """Mark up to ``limit`` queued rows claimed and return them, oldest first per class (see above)."""
        return self._submit("claim", int(limit)) if limit > 0 else []

    def mark_delivered(self, ids: Iterable[int]) -> int:
        """Delete rows the cloud acknowledged; returns how many existed."""
        return self._submit("delivered", sorted(set(ids)))

    def mark_failed(self, row_id: int, reason_code: int) -> None:
        """Dead-letter a claimed row the cloud refused with ``reason_code`` (>= 0x80)."""
        self.mark_failed_many([(row_id, reason_code)])

    def mark_failed_many(self, failures: Sequence[tuple[int, int]]) -> None:
        self._submit("failed", list(failures))

    def release_claims(self, ids: Iterable[int] | None = None) -> int:
        """Return claimed rows (all, or those in ``ids``) to the queue; returns how many."""
        return self._submit("release", None if ids is None else sorted(set(ids)))

    def retry_dead(self, ids: Iterable[int] | None = None) -> int:
        """Queue dead rows (all, or those in ``ids``) again with a fresh refusal count; returns how many."""
        return self._submit("retry_dead", None if ids is None else sorted(set(ids)))

    def stats(self) -> OutboxStats:
        return self._submit("stats")

    def peek(self, n: int = 20, *, cls: MessageClass | None = None, state: str | None = None) -> list[OutboxEntry]:
        """The ``n`` oldest rows, optionally of one class and/or state (queued, claimed, dead)."""
        return self._submit("peek", n, cls, state)

    def add_queued_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the writer thread; it must not block) whenever rows become queued."""
        self._listeners.append(callback)

    def close(self) -> None:
        """Finish every write already submitted, then close the file. Later calls raise OutboxError."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writer thread ------------------------------------------------------------------------------

    def _submit(self, op: str, *args: Any) -> Any:
        return self._submit_nowait(op, *args).result()

    def _submit_nowait(self, op: str, *args: Any) -> Future[Any]:
        command = _Command(op, args)
        if self.read_only and not command.read:
            raise OutboxError(f"outbox {self.path} is open read-only")
        with self._submit_lock:
            if self._closed:
                raise OutboxError(f"outbox {self.path} is closed")
            self._queue.put(command)
        return command.future

    def _run(self, ready: Future[None]) -> None:
        try:
            self._open()
        except Exception as exc:
            self._release_lock()
            ready.set_exception(exc if isinstance(exc, OutboxError) else OutboxError(f"outbox {self.path}: {exc}"))
            return
        ready.set_result(None)
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=self._idle_timeout())
            except queue.Empty:
                if self.read_only or self._ledger is None or not self._ledger.count:
                    continue
                first = _Command("maintain", ())
            batch = [first]
            try:
                with HEARTBEATS.busy("outbox-writer"):
                    batch, stopping = self._gather(first)
                    self._execute(batch)
            except Exception as exc:
                # A bug or a broken connection must never leave a caller blocked on its future.
                INTERNAL_ERRORS.record("outbox_writer", exc)
                for command in batch:
                    if not command.future.done():
                        command.future.set_exception(OutboxError(f"outbox {self.path}: {exc}"))
        if self._ledger is not None:
            if not self.read_only:
                self._mark_clean_shutdown(self._ledger)
            self._ledger.db.close()
        self._release_lock()

    def _mark_clean_shutdown(self, ledger: Ledger) -> None:
        try:
            with store.write_transaction(ledger.db):
                store.write_meta(ledger.tables, **{store.CLEAN_SHUTDOWN: "1"})
        except Exception as exc:  # the next open then runs the full integrity check: slower, still right
            log.warning("outbox %s: cannot record the clean shutdown: %s", self.path, exc)

    def _gather(self, first: _Command) -> tuple[list[_Command], bool]:
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.settings.commit_interval_ms / 1000
        while len(batch) < self.settings.batch_max:
            wait = deadline - time.monotonic()
            try:
                command = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if command is _STOP:
                return batch, True
            batch.append(command)
        return batch, False

    def _idle_timeout(self) -> float:
        due = self._ledger.next_retry if self._ledger is not None else None
        if due is None or self.read_only or self._failing:  # a failing disk is not retried in a tight loop
            return _MAINTENANCE_S
        try:
            return min(_MAINTENANCE_S, max(0.01, float(due) - self._clock.now()))
        except (TypeError, ValueError):  # a retry time read back from a damaged row; raising here kills the writer
            return _MAINTENANCE_S

    def _execute(self, batch: list[_Command]) -> None:
        writes = [c for c in batch if not c.read]
        if writes:
            self._execute_writes(writes)
        for command in batch:
            if command.read:
                try:
                    command.future.set_result(self._read(command))
                except Exception as exc:
                    command.future.set_exception(exc if isinstance(exc, OutboxError) else OutboxError(str(exc)))

    def _read(self, command: _Command) -> Any:
        ledger = self._ensure_open()
        if command.op == "stats":
            return ledger.stats(transactions=self._transactions, write_errors=self._write_errors)
        return ledger.peek(*command.args)

    def _execute_writes(self, writes: list[_Command]) -> None:
        try:
            ledger = self._ensure_open()
            ledger.begin()
            durable = any(c.op not in _UNSYNCED_OPS for c in writes)
            with store.write_transaction(ledger.db, durable=durable):
                results = [getattr(ledger, c.op)(*c.args) for c in writes]
                evicted = ledger.finish(force_heartbeat=any(c.op == "maintain" for c in writes))
        except Exception as exc:
            self._write_errors += 1
            self._failing = True
            error = self._describe_failure(exc, writes)
            self._after_failed_write(exc)
            for command in writes:
                command.future.set_exception(error)
            return
        self._transactions += 1
        self._failing = False
        for command, result in zip(writes, results):
            if command.op == "enqueue":
                result = [None if row_id is None or row_id in evicted else row_id for row_id in result]
            command.future.set_result(result)
        if ledger.queued_grew:
            for callback in list(self._listeners):
                try:
                    callback()
                except Exception:
                    log.exception("outbox listener failed")

    def _describe_failure(self, exc: Exception, writes: list[_Command]) -> OutboxError:
        if isinstance(exc, OutboxError):
            return exc
        what = f"{len(writes)} write(s) ({', '.join(sorted({c.op for c in writes}))}) not applied"
        if store.sqlite_code(exc) == SQLITE_FULL or getattr(exc, "errno", None) == 28:
            log.error("outbox %s: disk full or max_file_bytes reached; %s", self.path, what)
            return OutboxError(
                f"outbox {self.path}: disk full (or max_file_bytes reached): {what}; every message stored "
                "before is kept, and writing resumes once space is freed"
            )
        log.error("outbox %s: %s: %s", self.path, what, exc)
        return OutboxError(f"outbox {self.path}: {what}: {exc}")

    def _after_failed_write(self, exc: Exception) -> None:
        try:
            if store.is_corruption(exc):
                self._recover(f"while writing: {exc}")
            if self._ledger is not None:
                self._ledger.load_accounting()
        except Exception as second:
            log.error("outbox %s: cannot recover after a failed write: %s", self.path, second)

    # -- opening, recovery --------------------------------------------------------------------------

    def _open(self) -> None:
        if not self.read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._acquire_lock()
        elif not self.path.exists():
            raise OutboxError(f"no outbox at {self.path}")
        try:
            self._connect()
            self._prepare()
        except Exception as exc:
            # Damage can also surface after the integrity check was skipped (clean shutdown) or passed:
            # the first full read of the rows is part of opening.
            if self.read_only or not store.is_corruption(exc):
                if isinstance(exc, OutboxError):
                    raise
                raise OutboxError(f"outbox {self.path} cannot be opened: {exc}") from exc
            self._recover(f"at open: {exc}")
            self._prepare()

    def _prepare(self) -> None:
        ledger = self._ensure_open()
        if not self.read_only:
            with store.write_transaction(ledger.db):
                ledger.release_all_claims_at_open()
                ledger.tables.meta.delete().where(ledger.tables.meta.key == store.CLEAN_SHUTDOWN).execute()
        ledger.load_accounting()

    def _ensure_open(self) -> Ledger:
        """The open ledger; reopens after a recovery that failed half-way (e.g. no space for a fresh file)."""
        if self._ledger is None:
            try:
                self._connect()
            except Exception as exc:
                if self.read_only or not store.is_corruption(exc):
                    raise
                self._recover(f"at reopen: {exc}")
            assert self._ledger is not None
            self._ledger.load_accounting()
        return self._ledger

    def _connect(self) -> None:
        if self._ledger is not None:
            self._ledger.db.close()
            self._ledger = None
        store.verify(self.path)
        db = store.connect(self.path, read_only=self.read_only, max_file_bytes=self.settings.max_file_bytes)
        try:
            version = store.check_and_migrate(db, self.path, read_only=self.read_only)
        except Exception:
            db.close()
            raise
        self._ledger = Ledger(
            db, self.settings, self._clock, path=self.path, schema_version=version, read_only=self.read_only
        )

    def _recover(self, cause: str) -> None:
        if self._ledger is not None:
            self._ledger.db.close()
            self._ledger = None
        try:
            moved = store.move_aside(self.path, self._clock.wall())
        except OSError as exc:
            raise OutboxError(f"outbox {self.path} is corrupt and cannot be moved aside: {exc}") from exc
        salvaged = store.salvage(moved)
        self._connect()
        assert self._ledger is not None
        event = CorruptionEvent(
            at=datetime.fromtimestamp(self._clock.wall(), UTC),
            moved_to=str(moved),
            rows_salvaged=len(salvaged.rows),
            cause=cause[:500],
        )
        tables, db = self._ledger.tables, self._ledger.db
        with store.write_transaction(db):
            for start in range(0, len(salvaged.rows), 50):
                tables.row.insert_many(salvaged.rows[start : start + 50]).execute()
            counters = Counter(salvaged.counters)
            counters["corruption_events"] += 1
            tables.counter.insert_many([{"name": k, "value": v} for k, v in counters.items()]).execute()
            kept = {k: v for k, v in salvaged.meta.items() if k in ("boot_id", "boot_clock", "last_delivery_wall")}
            store.write_meta(tables, **kept, last_corruption=event.model_dump_json())
            # Ids must keep growing past every id the lost file handed out: they are the upstream `seq`.
            if not db.execute_sql(
                "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'outbox'", (salvaged.max_id,)
            ).rowcount:
                db.execute_sql("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (salvaged.max_id,))
        log.error(
            "OUTBOX CORRUPT (%s): moved %s (and its -wal/-shm) to %s; %d message(s) salvaged into a fresh "
            "outbox; messages SQLite could not read are lost unless recovered by hand from the moved file",
            cause,
            self.path,
            moved,
            len(salvaged.rows),
        )

    def _acquire_lock(self) -> None:
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutboxError(f"outbox {self.path} is in use by another process (lock {self.path}.lock)") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

"""The outbox's writer thread: the one thread that touches the SQLite file, with its group commit.

Callers hand commands to :class:`OutboxWriter` through a queue and wait on a future; the thread folds every
command waiting at that moment (up to ``batch_max``) into one transaction, and owns opening, the lock file,
and recovery of a corrupt file. The guarantees it keeps are documented in :mod:`agent.upstream.outbox`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.compat import SQLITE_FULL, UTC
from agent.config import OutboxSettings
from agent.errors import OutboxError
from agent.faults import HEARTBEATS, INTERNAL_ERRORS
from agent.upstream import outbox_file as store
from agent.upstream import outbox_reports, outbox_salvage
from agent.upstream.outbox_ledger import Ledger
from agent.upstream.outbox_models import CorruptionEvent

# The outbox's logger, shared by all its modules: operators and tests filter on one name.
log = logging.getLogger("agent.upstream.outbox")

_MAINTENANCE_S = 30.0
_READ_OPS = frozenset({"stats", "peek"})
# Claims need no fsync of their own: every claim is undone at open anyway, and the next durable commit
# syncs the WAL they were written to.
_UNSYNCED_OPS = frozenset({"claim", "release"})


@dataclass
class _Command:
    op: str
    args: tuple[Any, ...]
    future: Future[Any] = field(default_factory=Future)

    @property
    def read(self) -> bool:
        return self.op in _READ_OPS


_STOP = _Command("stop", ())


class OutboxWriter:
    """Owns the outbox file and the thread that reads and writes it; one per :class:`~agent.upstream.outbox.Outbox`.

    Starting it opens (and if needed recovers) the file and raises :class:`OutboxError` if that fails.
    """

    def __init__(self, path: Path, settings: OutboxSettings, *, read_only: bool, clock: store.OutboxClock) -> None:
        self.path = path
        self.settings = settings
        self.read_only = read_only
        self._clock = clock
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

    def submit(self, op: str, *args: Any) -> Any:
        """Run ledger operation ``op`` on the writer thread and return its result (raises its error)."""
        return self.submit_nowait(op, *args).result()

    def submit_nowait(self, op: str, *args: Any) -> Future[Any]:
        """Queue ledger operation ``op``; the future resolves on the writer thread once it is committed."""
        command = _Command(op, args)
        if self.read_only and not command.read:
            raise OutboxError(f"outbox {self.path} is open read-only")
        with self._submit_lock:
            if self._closed:
                raise OutboxError(f"outbox {self.path} is closed")
            self._queue.put(command)
        return command.future

    def add_queued_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the writer thread after every commit that queued rows."""
        self._listeners.append(callback)

    def close(self) -> None:
        """Finish every command already submitted, then close the file and end the thread."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

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
            return outbox_reports.stats(ledger, transactions=self._transactions, write_errors=self._write_errors)
        return outbox_reports.peek(ledger, *command.args)

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
            moved = outbox_salvage.move_aside(self.path, self._clock.wall())
        except OSError as exc:
            raise OutboxError(f"outbox {self.path} is corrupt and cannot be moved aside: {exc}") from exc
        salvaged = outbox_salvage.salvage(moved)
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

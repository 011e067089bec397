"""The outbox writer's hold on its SQLite file: the lock, the open ledger, opening and recovery.

Opening takes the lock file (a writer), refuses damage SQLite would pass over (:mod:`agent.upstream.outbox_wal`),
verifies and migrates the file, and undoes every claim; on a full disk it gives the reserve back and tries once
more. A corrupt file, at open or found later, is moved aside and its rows salvaged into a fresh one
(:mod:`agent.upstream.outbox_salvage`). Only the writer thread (:mod:`agent.upstream.outbox_writer`) calls it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agent.config import OutboxSettings
from agent.errors import OutboxError
from agent.upstream import outbox_file as store
from agent.upstream import outbox_wal
from agent.upstream.outbox_ledger import Ledger
from agent.upstream.outbox_models import CorruptionEvent, Listeners
from agent.upstream.outbox_space import DiskSpace

# The outbox's logger, shared by all its modules: operators and tests filter on one name.
log = logging.getLogger("agent.upstream.outbox")


class OutboxHandle:
    """The outbox file as its writer holds it; ``ledger`` is None until opened and after a failed recovery."""

    def __init__(
        self,
        path: Path,
        settings: OutboxSettings,
        *,
        read_only: bool,
        clock: store.OutboxClock,
        space: DiskSpace,
        corruptions: Listeners[CorruptionEvent],
    ) -> None:
        self.path = path
        self.settings = settings
        self.read_only = read_only
        self._clock = clock
        self._space = space
        self._corruptions = corruptions
        self._lock_fd: int | None = None
        self.ledger: Ledger | None = None

    def open(self) -> None:
        """Take the lock (a writer), connect, migrate, undo claims; recover a corrupt file. Raises OutboxError."""
        if not self.read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._lock_fd is None:  # held already when opening is retried after a full disk
                self._lock_fd = store.lock_exclusive(self.path)
        elif not self.path.exists():
            raise OutboxError(f"no outbox at {self.path}")
        try:
            self._connect_and_prepare()
        except Exception as exc:
            # Damage can also surface after the integrity check was skipped (clean shutdown) or passed:
            # the first full read of the rows is part of opening.
            if self.read_only or not store.is_corruption(exc):
                if isinstance(exc, OutboxError):
                    raise
                raise OutboxError(f"outbox {self.path} cannot be opened: {exc}") from exc
            self.recover(f"at open: {exc}")
            self._prepare()
        if not self.read_only and not self._space.take_reserve():
            self._space.exhausted(f"less than {2 * self._space.reserve_bytes} bytes free at open")

    def _connect_and_prepare(self) -> None:
        """Open the file; on a full disk give back the reserve and try once more (opening writes a little)."""
        created = not self.path.exists()
        try:
            self._connect()
            self._prepare()
        except Exception as exc:
            self._close_ledger()
            if created and self.path.exists() and self.path.stat().st_size == 0:
                self.path.unlink()  # ours, from this attempt: left behind it would look like a destroyed outbox
            if self.read_only or not self._space.explains(exc) or not self._space.release_reserve():
                raise
            log.error("outbox %s: disk full at open, reserve released: %s", self.path, exc)
            self._connect()
            self._prepare()

    def _prepare(self) -> None:
        ledger = self.ensure_open()
        if not self.read_only:
            with store.write_transaction(ledger.db):
                ledger.release_all_claims_at_open()
                ledger.tables.meta.delete().where(ledger.tables.meta.key == store.CLEAN_SHUTDOWN).execute()
        ledger.load_accounting()

    def ensure_open(self) -> Ledger:
        """The open ledger; reopens after a recovery that failed half-way (e.g. no space for a fresh file)."""
        if self.ledger is None:
            try:
                self._connect()
            except Exception as exc:
                if self.read_only or not store.is_corruption(exc):
                    raise
                self.recover(f"at reopen: {exc}")
            assert self.ledger is not None
            self.ledger.load_accounting()
        return self.ledger

    def _close_ledger(self) -> None:
        if self.ledger is not None:
            self.ledger.db.close()
            self.ledger = None

    def _connect(self) -> None:
        self._close_ledger()
        # A reader would see the writer's WAL mid-append; only the writer acts on what it finds.
        damage = None if self.read_only else outbox_wal.damage_at_rest(self.path)
        if damage is not None:
            raise store.CorruptFile(damage)
        store.verify(self.path)
        db = store.connect(
            self.path,
            read_only=self.read_only,
            max_file_bytes=self.settings.max_file_bytes,
            wal_limit_bytes=self._space.wal_limit_bytes,
        )
        try:
            version = store.check_and_migrate(db, self.path, read_only=self.read_only)
        except Exception:
            db.close()
            raise
        self.ledger = Ledger(
            db, self.settings, self._clock, path=self.path, schema_version=version, read_only=self.read_only
        )

    def recover(self, cause: str) -> None:
        """Move the corrupt file aside, start a fresh one with every row salvaged from it, and report the event."""
        from agent.upstream import outbox_salvage  # only for a damaged file: not imported on the way to online

        self._close_ledger()
        try:
            moved = outbox_salvage.move_aside(self.path, self._clock.wall())
        except OSError as exc:
            raise OutboxError(f"outbox {self.path} is corrupt and cannot be moved aside: {exc}") from exc
        salvaged = outbox_salvage.salvage(moved)
        self._connect()
        assert self.ledger is not None
        with store.write_transaction(self.ledger.db):
            event = outbox_salvage.restore(
                self.ledger.tables, salvaged, path=self.path, cause=cause, wall=self._clock.wall()
            )
        self._corruptions.notify(event)

    def release_lock(self) -> None:
        """Let another writer open the file."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        """Record a clean shutdown (a writer), close the file and release the lock."""
        if self.ledger is not None:
            if not self.read_only:
                self._mark_clean_shutdown(self.ledger)
            self.ledger.db.close()
        self.release_lock()

    def _mark_clean_shutdown(self, ledger: Ledger) -> None:
        try:
            with store.write_transaction(ledger.db):
                store.write_meta(ledger.tables, **{store.CLEAN_SHUTDOWN: "1"})
        except Exception as exc:  # the next open then runs the full integrity check: slower, still right
            log.warning("outbox %s: cannot record the clean shutdown: %s", self.path, exc)

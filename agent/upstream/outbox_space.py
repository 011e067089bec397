"""The outbox's room on disk: a reserve file that lets the outbox climb out of a full disk by itself.

On a full disk SQLite can do nothing at all: deleting a delivered row appends to the WAL, and checkpointing
the WAL grows the database file. An outbox whose own WAL filled the disk therefore never delivered again
(measured: 0 of 1,210 rows after the cloud returned). So the outbox keeps ``[outbox] reserve_bytes`` in a file
of its own (``outbox.db.reserve``) and keeps its WAL under half of that (``wal_autocheckpoint``,
``journal_size_limit``). When a write fails for lack of space (:meth:`DiskSpace.exhausted`):

1. the reserve is deleted, and the WAL is checkpointed into the database and truncated: the reserve is
   larger than anything that checkpoint can add to the file;
2. new messages are refused (callers count them) while claims, deliveries and releases go on, each delivery
   freeing room inside the database file for later messages;
3. once the filesystem has the reserve free again (looked at before every write and every second while
   short), the reserve is taken back and new messages are accepted again.

The policy is a reserve, not shedding by class: what is already stored is never given up for space; what
cannot be stored is refused at the door and counted (``outbox_write_failed_{class}``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from agent.errors import OutboxError
from agent.compat import SQLITE_IOERR
from agent.upstream.outbox_file import is_out_of_space, sqlite_code

log = logging.getLogger("agent.upstream.outbox")

RESERVE_SUFFIX = ".reserve"
_NEARLY_FULL_BYTES = 1024 * 1024


class DiskSpace:
    """The reserve file beside the outbox at ``path``, and whether new messages are refused for space."""

    def __init__(self, path: Path, reserve_bytes: int) -> None:
        self.reserve_path = Path(f"{path}{RESERVE_SUFFIX}")
        self.reserve_bytes = reserve_bytes
        self.short: str | None = None  # why new messages are refused now; None while they are accepted

    @property
    def wal_limit_bytes(self) -> int | None:
        """The WAL size the database is kept under (None: SQLite's defaults, without a reserve)."""
        return self.reserve_bytes // 2 if self.reserve_bytes else None

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the outbox's filesystem."""
        stats = os.statvfs(self.reserve_path.parent)
        return stats.f_bavail * stats.f_frsize

    def explains(self, exc: BaseException) -> bool:
        """Whether ``exc`` comes from a full disk. Besides SQLITE_FULL and ENOSPC, an I/O error counts while
        the filesystem is (nearly) full: SQLite reports one when it cannot grow its -shm file, e.g. at open."""
        if is_out_of_space(exc):
            return True
        if sqlite_code(exc) != SQLITE_IOERR:
            return False
        try:
            return self.free_bytes() < max(self.reserve_bytes, _NEARLY_FULL_BYTES)
        except OSError:
            return False

    def take_reserve(self) -> bool:
        """Put the reserve in place if it is missing and the filesystem has room; returns whether it is."""
        if not self.reserve_bytes:
            return True
        with contextlib.suppress(OSError):
            if self.reserve_path.stat().st_size >= self.reserve_bytes:
                return True
        try:
            # Twice the reserve free: taking it must not leave the disk full again at once.
            if self.free_bytes() < 2 * self.reserve_bytes:
                return False
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)  # real blocks: a sparse file would reserve nothing
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("outbox: cannot put the %d-byte disk reserve in place: %s", self.reserve_bytes, exc)
            with contextlib.suppress(OSError):
                self.reserve_path.unlink()
            return False
        return True

    def release_reserve(self) -> bool:
        """Delete the reserve (the disk is full); returns whether there was one to free."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        return True

    def exhausted(self, cause: str) -> None:
        """A write failed for lack of space: free the reserve and refuse new messages until space returns."""
        with contextlib.suppress(OSError):
            if self.reserve_bytes and self.free_bytes() >= 2 * self.reserve_bytes:
                return  # the file reached max_file_bytes, the disk has room: deliveries make room in the file
        freed = self.release_reserve()
        if self.short is None:
            log.error(
                "outbox: disk full (%s); %s; new messages are refused until %d bytes are free again, deliveries go on",
                cause,
                "reserve released" if freed else "no reserve left",
                2 * self.reserve_bytes,
            )
        self.short = f"disk full: new messages refused until {2 * self.reserve_bytes} bytes are free ({cause})"

    def recovered(self) -> bool:
        """Whether new messages may be stored: looks at the filesystem again while short of space."""
        if self.short is None:
            return True
        if not self.take_reserve():
            return False
        log.warning("outbox: disk space is back (reserve in place); storing new messages again")
        self.short = None
        return True


def describe_write_failure(path: Path, exc: Exception, ops: list[str], *, out_of_space: bool) -> OutboxError:
    """The error a failed write transaction gives its callers (logged once here)."""
    if isinstance(exc, OutboxError):
        return exc
    what = f"{len(ops)} write(s) ({', '.join(sorted(set(ops)))}) not applied"
    if out_of_space:
        log.error("outbox %s: disk full or max_file_bytes reached; %s", path, what)
        return OutboxError(
            f"outbox {path}: disk full (or max_file_bytes reached): {what}; every message stored "
            "before is kept, and writing resumes once space is freed"
        )
    log.error("outbox %s: %s: %s", path, what, exc)
    return OutboxError(f"outbox {path}: {what}: {exc}")

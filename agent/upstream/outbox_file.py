"""The outbox's SQLite file: schema and migrations, opening with an integrity check, and the boot clock that
ages and TTLs are measured on. Used only by the outbox's own modules; salvage of a corrupt file is
:mod:`agent.upstream.outbox_salvage`.

Time. A Raspberry Pi has no real-time clock: its wall clock starts wherever fake-hwclock left it and jumps
when NTP syncs. Ages, TTLs and retry times are therefore kept on ``CLOCK_BOOTTIME`` (seconds since boot,
counting suspend, never jumping). Those readings only mean something within one boot, so the file records
which boot they belong to (the kernel's ``boot_id``) and the last reading taken (``boot_clock``, refreshed
by write transactions at most once a second and every 30 s while messages wait). When the file is opened in
a later boot, every stored reading is shifted so that the last reading of the old boot maps to "now": time
spent powered off (and up to 30 s before the cut) counts as zero. A message can therefore outlive its TTL
by the length of an outage, but no clock jump can ever expire it early. The wall time at enqueue is stored
too, for people to read; nothing is computed from it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peewee

from agent.compat import SQLITE_CORRUPT, SQLITE_ERROR, SQLITE_FULL, SQLITE_NOTADB, sqlite_error_code
from agent.errors import OutboxError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
QUEUED, CLAIMED, DEAD = "queued", "claimed", "dead"
CLEAN_SHUTDOWN = "clean_shutdown"  # meta key present only while the file is closed after a clean shutdown
SIDE_FILES = ("-wal", "-shm")
# Page cache of the writer's connection, KiB (SQLite's default is 2,000): rows live in the outbox for milliseconds
# under load, so the pages in use are the few being appended, claimed and deleted; the rest is OS page cache.
_CACHE_KIB = 512
_PROCESS_BOOT_ID = uuid.uuid4().hex


class OutboxClock:
    """Where the outbox reads time: the boot clock for arithmetic, the wall clock only for display."""

    def now(self) -> float:
        """Seconds on a clock that never jumps within one boot (CLOCK_BOOTTIME where the OS has it)."""
        if hasattr(time, "CLOCK_BOOTTIME"):
            return time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def boot_id(self) -> str:
        """Identifies the current boot; without one, every process counts as a new boot (conservative)."""
        try:
            return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or _PROCESS_BOOT_ID
        except OSError:
            return _PROCESS_BOOT_ID


def _v1(db: peewee.SqliteDatabase) -> None:
    # Frozen DDL of schema 1: later versions add steps, they never edit this one.
    db.execute_sql(
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            msg_id TEXT NOT NULL,
            cls TEXT NOT NULL,
            body BLOB NOT NULL,
            size INTEGER NOT NULL,
            enqueued_wall REAL NOT NULL,
            enqueued_clock REAL NOT NULL,
            expires_clock REAL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            last_reason INTEGER,
            retry_clock REAL)"""
    )
    db.execute_sql("CREATE INDEX outbox_state_cls_id ON outbox (state, cls, id)")
    db.execute_sql("CREATE INDEX outbox_expiry ON outbox (expires_clock) WHERE expires_clock IS NOT NULL")
    db.execute_sql("CREATE TABLE counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute_sql("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


# MIGRATIONS[n] takes a file from user_version n to n + 1, inside one transaction with the version bump.
MIGRATIONS: tuple[Callable[[peewee.SqliteDatabase], None], ...] = (_v1,)
ROW_COLUMNS = (
    "id",
    "msg_id",
    "cls",
    "body",
    "size",
    "enqueued_wall",
    "enqueued_clock",
    "expires_clock",
    "state",
    "attempts",
    "failures",
    "last_reason",
    "retry_clock",
)


@dataclass(frozen=True)
class Tables:
    """Peewee models bound to one database; built per store so two stores never share a binding."""

    row: Any
    counter: Any
    meta: Any


def bind_tables(db: peewee.SqliteDatabase) -> Tables:
    class Row(peewee.Model):
        id = peewee.AutoField()
        msg_id = peewee.TextField()
        cls = peewee.TextField()
        body = peewee.BlobField()
        size = peewee.IntegerField()
        enqueued_wall = peewee.FloatField()
        enqueued_clock = peewee.FloatField()
        expires_clock = peewee.FloatField(null=True)
        state = peewee.TextField()
        attempts = peewee.IntegerField(default=0)
        failures = peewee.IntegerField(default=0)
        last_reason = peewee.IntegerField(null=True)
        retry_clock = peewee.FloatField(null=True)

        class Meta:
            database = db
            table_name = "outbox"

    class Counter(peewee.Model):
        name = peewee.TextField(primary_key=True)
        value = peewee.IntegerField()

        class Meta:
            database = db
            table_name = "counter"

    class MetaValue(peewee.Model):
        key = peewee.TextField(primary_key=True)
        value = peewee.TextField()

        class Meta:
            database = db
            table_name = "meta"

    return Tables(Row, Counter, MetaValue)


def body_size(row: Any) -> Any:
    """The byte size of a row's body, as SQL: what every total and bound is computed from.

    The ``size`` column is written with each row but never trusted when read back: a damaged or hand-edited
    file can hold any integer there, and a bogus one would evict every other row, or overflow ``SUM`` and keep
    the outbox from opening. ``length()`` of a blob reads the row's header, not its content.
    """
    return peewee.fn.LENGTH(row.body)


def sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code behind ``exc`` (Peewee wraps sqlite3 errors), or None."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        code = sqlite_error_code(item)
        if code is not None:
            return code
        stack.extend([item.__cause__, item.__context__])
        stack.extend(arg for arg in item.args if isinstance(arg, BaseException))
    return None


@contextmanager
def write_transaction(db: peewee.SqliteDatabase, *, durable: bool = True) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error unless SQLite already did so itself (it does
    on SQLITE_FULL, and a second rollback would replace the real error with "no transaction is active").

    ``durable=False`` commits with ``synchronous=NORMAL``: no fsync at commit (the transaction may be lost
    to a power cut, never torn), while checkpoints still sync, so earlier durable commits stay durable.
    """
    if not durable:
        db.execute_sql("PRAGMA synchronous = NORMAL")
    try:
        db.execute_sql("BEGIN IMMEDIATE")
        try:
            yield
            db.execute_sql("COMMIT")
        except BaseException:
            if db.connection().in_transaction:
                db.execute_sql("ROLLBACK")
            raise
    finally:
        if not durable:
            db.execute_sql("PRAGMA synchronous = FULL")


class CorruptFile(OutboxError):
    """The file opens but fails SQLite's integrity check."""


def is_corruption(exc: BaseException) -> bool:
    return isinstance(exc, CorruptFile) or sqlite_code(exc) in (SQLITE_CORRUPT, SQLITE_NOTADB)


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or ``max_file_bytes``) is full."""
    return sqlite_code(exc) == SQLITE_FULL or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)


def connect(
    path: Path, *, read_only: bool, max_file_bytes: int | None, wal_limit_bytes: int | None = None
) -> peewee.SqliteDatabase:
    """Open (creating if needed) the database in WAL mode with ``synchronous=FULL``: a commit is on disk.

    ``wal_limit_bytes``: checkpoint once the WAL reaches about this size, and truncate it back to it, so that a
    checkpoint never needs more free disk than the outbox's reserve (:mod:`agent.upstream.outbox_space`).
    """
    if read_only:
        db = peewee.SqliteDatabase(
            f"file:{path}?mode=ro", uri=True, timeout=5, autoconnect=False, pragmas={"query_only": 1}
        )
    else:
        pragmas: dict[str, Any] = {
            "journal_mode": "wal",
            "synchronous": "full",
            "journal_size_limit": wal_limit_bytes if wal_limit_bytes is not None else 8 * 1024 * 1024,
            "cache_size": -_CACHE_KIB,
        }
        db = peewee.SqliteDatabase(str(path), timeout=5, autoconnect=False, pragmas=pragmas)
    db.connect()
    if wal_limit_bytes is not None and not read_only:
        page_size = int(db.execute_sql("PRAGMA page_size").fetchone()[0])
        db.execute_sql(f"PRAGMA wal_autocheckpoint = {max(16, wal_limit_bytes // page_size)}")
    if max_file_bytes is not None and not read_only:
        page_size = int(db.execute_sql("PRAGMA page_size").fetchone()[0])
        db.execute_sql(f"PRAGMA max_page_count = {max(1, max_file_bytes // page_size)}")
    return db


def lock_exclusive(path: Path) -> int:
    """Take the outbox's lock file (one writer process at a time); returns its descriptor, held until closed."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutboxError(f"outbox {path} is in use by another process (lock {path}.lock)") from None
    return fd


def checkpoint(db: peewee.SqliteDatabase | None) -> None:
    """Copy the WAL into the database and truncate it to nothing: gives its disk space back."""
    if db is None:
        return
    try:
        db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    except Exception as exc:  # a checkpoint that cannot finish now leaves the WAL as it was: nothing is lost
        log.warning("outbox: cannot checkpoint the WAL: %s", exc)


def compact(db: peewee.SqliteDatabase | None, free_bytes: int, min_gain_bytes: int) -> None:
    """Give the database file's free pages back to the filesystem (``VACUUM``) when that frees at least
    ``min_gain_bytes`` and the rows left fit twice into ``free_bytes``: after a full disk, delivering every row
    leaves the file as large as it grew, and the disk as full."""
    if db is None:
        return
    try:
        page_size, pages, free_pages = (
            int(db.execute_sql(f"PRAGMA {name}").fetchone()[0]) for name in ("page_size", "page_count", "freelist_count")
        )
        if free_pages * page_size < min_gain_bytes or 2 * (pages - free_pages) * page_size > free_bytes:
            return
        db.execute_sql("VACUUM")
    except Exception as exc:  # VACUUM is all or nothing: the file stays as it was
        log.warning("outbox: cannot compact the database file: %s", exc)
        return
    checkpoint(db)


def verify(path: Path) -> None:
    """Check an existing file; raises :class:`CorruptFile` or a sqlite3 error if it is damaged.

    After a crash this runs SQLite's ``quick_check``, which reads the whole file. After a clean shutdown it
    only reads the header and the shutdown marker: a restart should not cost seconds per hundred megabytes,
    and damage that appears at rest still surfaces as SQLITE_CORRUPT when the rows are read at open.
    The connection is read-only: closing a writable one checkpoints the WAL into the main file, which would
    rewrite a damaged file (and delete its -wal) before it can be moved aside as found.
    """
    if not path.exists():
        return
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        try:
            marker = conn.execute("SELECT value FROM meta WHERE key = ?", (CLEAN_SHUTDOWN,)).fetchone()
        except sqlite3.OperationalError as exc:
            if sqlite_code(exc) != SQLITE_ERROR:  # "no such table" in a new file is fine
                raise
            marker = None
        if marker is not None:
            return
        verdict = conn.execute("PRAGMA quick_check(1)").fetchone()
    finally:
        conn.close()
    if verdict is None or verdict[0] != "ok":
        raise CorruptFile(f"integrity check failed: {verdict[0] if verdict else 'no answer'}")


def check_and_migrate(db: peewee.SqliteDatabase, path: Path, *, read_only: bool) -> int:
    """Bring the file's schema to :data:`SCHEMA_VERSION`; returns the version.

    Raises :class:`OutboxError` for a file written by a newer agent (left untouched: migrating down would
    strand rows).
    """
    version = int(db.execute_sql("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise OutboxError(
            f"{path} has outbox schema {version}, newer than this agent's {SCHEMA_VERSION}: "
            "run the newer agent, or move the file away to start an empty outbox"
        )
    if read_only:
        if version != SCHEMA_VERSION:
            raise OutboxError(f"{path} has outbox schema {version}: start the agent once to migrate it")
        return version
    for step in range(version, SCHEMA_VERSION):
        with write_transaction(db):
            MIGRATIONS[step](db)
            db.execute_sql(f"PRAGMA user_version = {step + 1}")
        log.info("outbox %s migrated to schema %d", path, step + 1)
    return SCHEMA_VERSION


def rebase_clock(tables: Tables, clock: OutboxClock) -> None:
    """Re-express stored boot-clock readings on this boot's clock (see the module docstring)."""
    meta = {m.key: m.value for m in tables.meta.select()}
    row = tables.row
    now, current_boot = clock.now(), clock.boot_id()
    if meta.get("boot_id") != current_boot:
        if "boot_clock" in meta:
            last_seen = float(meta["boot_clock"])
        else:
            last_seen = row.select(peewee.fn.MAX(row.enqueued_clock)).scalar() or now
        shift = now - last_seen
        row.update(
            enqueued_clock=row.enqueued_clock + shift,
            expires_clock=row.expires_clock + shift,
            retry_clock=row.retry_clock + shift,
        ).execute()
    write_meta(tables, boot_id=current_boot, boot_clock=repr(now))


def write_meta(tables: Tables, **values: str) -> None:
    """Set meta keys. Plain SQL: the writer calls this on every delivery and heartbeat, where building the
    statement through Peewee's query builder cost more than running it."""
    db = tables.meta._meta.database
    for key, value in values.items():
        db.execute_sql("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

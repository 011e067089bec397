"""The outbox's SQLite file: schema and migrations, opening with an integrity check, salvage of a corrupt
file, and the boot clock that ages and TTLs are measured on. Used only by :mod:`agent.upstream.outbox`.

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

import logging
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import peewee

from agent.compat import SQLITE_CORRUPT, SQLITE_ERROR, SQLITE_NOTADB, UTC, sqlite_error_code
from agent.config import MESSAGE_CLASSES
from agent.errors import OutboxError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
QUEUED, CLAIMED, DEAD = "queued", "claimed", "dead"
CLEAN_SHUTDOWN = "clean_shutdown"  # meta key present only while the file is closed after a clean shutdown
SIDE_FILES = ("-wal", "-shm")
_SALVAGE_CHUNK = 512
_SALVAGE_PROBE_SPAN = 4096
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


def connect(path: Path, *, read_only: bool, max_file_bytes: int | None) -> peewee.SqliteDatabase:
    """Open (creating if needed) the database in WAL mode with ``synchronous=FULL``: a commit is on disk."""
    if read_only:
        db = peewee.SqliteDatabase(
            f"file:{path}?mode=ro", uri=True, timeout=5, autoconnect=False, pragmas={"query_only": 1}
        )
    else:
        pragmas: dict[str, Any] = {
            "journal_mode": "wal",
            "synchronous": "full",
            "journal_size_limit": 8 * 1024 * 1024,
        }
        db = peewee.SqliteDatabase(str(path), timeout=5, autoconnect=False, pragmas=pragmas)
    db.connect()
    if max_file_bytes is not None and not read_only:
        page_size = int(db.execute_sql("PRAGMA page_size").fetchone()[0])
        db.execute_sql(f"PRAGMA max_page_count = {max(1, max_file_bytes // page_size)}")
    return db


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


@dataclass(frozen=True)
class Salvage:
    """What could be read back out of a corrupt file."""

    moved_to: Path
    rows: list[dict[str, Any]]
    counters: dict[str, int]
    meta: dict[str, str]
    max_id: int


def move_aside(path: Path, wall: float) -> Path:
    """Rename the database and its -wal/-shm to a timestamped name next to it; returns the new main name."""
    stamp = datetime.fromtimestamp(wall, UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    serial = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{serial}")
        serial += 1
    for suffix in SIDE_FILES:
        side = Path(f"{path}{suffix}")
        if side.exists():
            side.rename(f"{target}{suffix}")
    if path.exists():
        path.rename(target)
    return target


def salvage(moved: Path) -> Salvage:
    """Read every row SQLite can still read from a moved-aside file, working on a scratch copy.

    The moved-aside files stay byte-for-byte as found (opening them would replay and checkpoint the WAL),
    so an operator can still try ``sqlite3 <file> .recover`` on them.
    """
    scratch_dir = Path(tempfile.mkdtemp(prefix=".outbox-salvage-", dir=moved.parent))
    scratch = scratch_dir / "salvage.db"
    rows: list[dict[str, Any]] = []
    counters: dict[str, int] = {}
    meta: dict[str, str] = {}
    max_id = 0
    try:
        if moved.exists():
            shutil.copyfile(moved, scratch)
        if Path(f"{moved}-wal").exists():
            shutil.copyfile(f"{moved}-wal", f"{scratch}-wal")
        conn = sqlite3.connect(scratch)
        try:
            rows = _salvage_rows(conn)
            counters = dict(_read_pairs(conn, "SELECT name, value FROM counter"))
            meta = {str(k): str(v) for k, v in _read_pairs(conn, "SELECT key, value FROM meta")}
            sequence = _read_pairs(conn, "SELECT name, seq FROM sqlite_sequence")
            max_id = max([int(seq) for name, seq in sequence if name == "outbox"] + [r["id"] for r in rows] + [0])
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as exc:
        log.error("outbox salvage of %s stopped early: %s", moved, exc)
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    return Salvage(moved, rows, {k: v for k, v in counters.items() if isinstance(v, int)}, meta, max_id)


def _read_pairs(conn: sqlite3.Connection, sql: str) -> list[tuple[Any, Any]]:
    try:
        return [tuple(r) for r in conn.execute(sql).fetchall()]
    except sqlite3.Error:
        return []


def _salvage_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    # Scan by id; where a damaged page breaks the scan, probe single ids past it so rows behind the
    # damage are still found, within a bounded amount of work. `after` only ever grows, so this ends.
    select = f"SELECT {', '.join(ROW_COLUMNS)} FROM outbox"
    found: list[dict[str, Any]] = []
    after = 0
    while True:
        progressed = False
        try:
            for values in conn.execute(f"{select} WHERE id > ? ORDER BY id LIMIT {_SALVAGE_CHUNK}", (after,)):
                after = int(values[0])
                progressed = True
                _keep_if_sound(found, values)
            if progressed:
                continue
            return found
        except sqlite3.Error:
            pass
        probed = _probe_past_damage(conn, select, after)
        if probed is None:
            return found
        after = int(probed[0])
        _keep_if_sound(found, probed)


def _probe_past_damage(conn: sqlite3.Connection, select: str, after: int) -> tuple[Any, ...] | None:
    for candidate in range(after + 1, after + 1 + _SALVAGE_PROBE_SPAN):
        try:
            values = conn.execute(f"{select} WHERE id = ?", (candidate,)).fetchone()
        except sqlite3.Error:
            continue
        if values is not None:
            return tuple(values)
    return None


def _keep_if_sound(found: list[dict[str, Any]], values: tuple[Any, ...]) -> None:
    row = dict(zip(ROW_COLUMNS, values))
    if not (
        isinstance(row["id"], int)
        and isinstance(row["msg_id"], str)
        and row["cls"] in MESSAGE_CLASSES
        and isinstance(row["body"], bytes)
        and isinstance(row["enqueued_clock"], float | int)
    ):
        return
    row["size"] = len(row["body"])
    row["state"] = QUEUED
    found.append(row)

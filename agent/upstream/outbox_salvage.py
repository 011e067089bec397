"""Salvage of a corrupt outbox file: move it aside as found, then read back every row SQLite still can.

Used only by the outbox writer's recovery (:mod:`agent.upstream.outbox_handle`); the file format itself is
:mod:`agent.upstream.outbox_file`.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.compat import UTC
from agent.config import MESSAGE_CLASSES
from agent.upstream.outbox_file import QUEUED, ROW_COLUMNS, SIDE_FILES, Tables, write_meta
from agent.upstream.outbox_models import CorruptionEvent
from agent.upstream.outbox_wal import committed_pages

# Kept from before the split, so logging configuration and log searches keep matching.
log = logging.getLogger("agent.upstream.outbox_file")

_SALVAGE_CHUNK = 512
_SALVAGE_PROBE_SPAN = 4096


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
        wal = Path(f"{moved}-wal")
        if moved.exists() and moved.stat().st_size == 0 and wal.exists():
            _rebuild_from_wal(wal, scratch)  # SQLite reads a WAL only beside a database that has a header
        else:
            if moved.exists():
                shutil.copyfile(moved, scratch)
            if wal.exists():
                shutil.copyfile(wal, f"{scratch}-wal")
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


def restore(tables: Tables, salvaged: Salvage, *, path: Path, cause: str, wall: float) -> CorruptionEvent:
    """Write what was salvaged into the fresh file at ``path`` with its corruption event (inside the caller's
    transaction), and log the event at ERROR."""
    event = CorruptionEvent(
        at=datetime.fromtimestamp(wall, UTC), moved_to=str(salvaged.moved_to), rows_salvaged=len(salvaged.rows),
        cause=cause[:500],
    )  # fmt: skip
    db = tables.row._meta.database
    for start in range(0, len(salvaged.rows), 50):
        tables.row.insert_many(salvaged.rows[start : start + 50]).execute()
    counters = Counter(salvaged.counters)
    counters["corruption_events"] += 1
    tables.counter.insert_many([{"name": k, "value": v} for k, v in counters.items()]).execute()
    kept = {k: v for k, v in salvaged.meta.items() if k in ("boot_id", "boot_clock", "last_delivery_wall")}
    write_meta(tables, **kept, last_corruption=event.model_dump_json())
    # Ids must keep growing past every id the lost file handed out: they are the upstream `seq`.
    if not db.execute_sql(
        "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'outbox'", (salvaged.max_id,)
    ).rowcount:
        db.execute_sql("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (salvaged.max_id,))
    # The writer's logger: operators and tests filter on it.
    logging.getLogger("agent.upstream.outbox").error(
        "OUTBOX CORRUPT (%s): moved %s (and its -wal/-shm) to %s; %d message(s) salvaged into a fresh "
        "outbox; messages SQLite could not read are lost unless recovered by hand from the moved file",
        cause,
        path,
        salvaged.moved_to,
        len(salvaged.rows),
    )
    return event


def _rebuild_from_wal(wal: Path, scratch: Path) -> None:
    """A database made of the WAL's committed pages alone (pages it lacks stay zero: salvage reads around them)."""
    found = committed_pages(wal)
    if found is None or not found[1]:
        return
    page_size, pages = found
    with open(scratch, "wb") as handle:
        for number, page in sorted(pages.items()):
            handle.seek((number - 1) * page_size)
            handle.write(page)


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

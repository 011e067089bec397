"""Outbox faults on real files: corruption, a full disk, a database size ceiling, and SIGKILL at any moment."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import OutboxSettings
from agent.errors import OutboxError
from agent.upstream.outbox import Outbox, OutboxItem

REPO = Path(__file__).resolve().parent.parent


def drain(outbox: Outbox) -> list[tuple[int, str, bytes]]:
    delivered = []
    while batch := outbox.claim_batch(200):
        outbox.mark_delivered(r.id for r in batch)
        delivered += [(r.id, r.msg_id, r.body) for r in batch]
    return delivered


def padded(i: int, size: int = 150) -> bytes:
    return json.dumps({"i": i, "pad": "x" * size}).encode()


def test_garbage_file_is_moved_aside_kept_and_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"not a database, torn or overwritten " * 300)
    original = path.read_bytes()
    with caplog.at_level(logging.ERROR, logger="agent.upstream.outbox"):
        store = Outbox(path)
    (moved,) = tmp_path.glob("outbox.db.corrupt-*")
    assert moved.read_bytes() == original
    stats = store.stats()
    assert stats.corruption_events == 1
    assert stats.last_corruption is not None
    assert (stats.last_corruption.moved_to, stats.last_corruption.rows_salvaged) == (str(moved), 0)
    assert any("OUTBOX CORRUPT" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    msg_id = store.enqueue("res", b"{}")
    assert [m for _, m, _ in drain(store)] == [msg_id]
    store.close()
    with Outbox(path) as reopened:
        assert reopened.stats().corruption_events == 1


def _outbox_table_pages(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [p for (p,) in conn.execute("SELECT pageno FROM dbstat WHERE name = 'outbox' AND pagetype = 'leaf'")]
    except sqlite3.OperationalError:  # SQLite built without dbstat: pages in the middle are mostly rows too
        return list(range(10, int(path.stat().st_size / 4096) - 5))
    finally:
        conn.close()


def _fill(path: Path, count: int = 2000) -> dict[str, bytes]:
    bodies: dict[str, bytes] = {}
    with Outbox(path) as store:
        items = [OutboxItem(cls="res", body=padded(i)) for i in range(count)]
        for start in range(0, len(items), 500):
            for item, msg_id in zip(items[start : start + 500], store.enqueue_many(items[start : start + 500])):
                bodies[msg_id] = item.body
    return bodies


def _damage(path: Path, pages: list[int]) -> None:
    with open(path, "r+b") as handle:
        for page in pages:
            handle.seek((page - 1) * 4096)
            handle.write(b"\xff" * 4096)  # 0xff is no b-tree page type: SQLite cannot misread it as rows


def test_damaged_pages_are_salvaged_around_and_the_wal_is_moved_with_the_file(tmp_path: Path) -> None:
    live = tmp_path / "live" / "outbox.db"
    bodies = _fill(live)
    pages = _outbox_table_pages(live)
    store = Outbox(live)
    for i in range(2000, 2010):
        bodies[store.enqueue("res", padded(i))] = padded(i)
    # A power cut now leaves the main file and the -wal holding the last commits.
    crashed = tmp_path / "crashed" / "outbox.db"
    crashed.parent.mkdir()
    shutil.copyfile(live, crashed)
    shutil.copyfile(f"{live}-wal", f"{crashed}-wal")
    store.close()
    _damage(crashed, pages[len(pages) // 3 : len(pages) // 3 + 3])
    evidence = {suffix: Path(f"{crashed}{suffix}").read_bytes() for suffix in ("", "-wal")}

    with Outbox(crashed) as recovered:
        (moved,) = crashed.parent.glob("outbox.db.corrupt-*[0-9Z]")
        for suffix, content in evidence.items():
            assert Path(f"{moved}{suffix}").read_bytes() == content
        stats = recovered.stats()
        assert stats.corruption_events == 1
        assert "integrity check failed" in stats.last_corruption.cause  # after a crash the full check runs
        salvaged = stats.last_corruption.rows_salvaged
        assert 0 < salvaged < len(bodies)
        new_id = recovered.enqueue("res", b"{}")
        rows = drain(recovered)
    assert len(rows) == salvaged + 1
    for _, msg_id, body in rows[:-1]:
        assert bodies[msg_id] == body
    assert rows[-1][1] == new_id
    assert rows[-1][0] > 2010  # ids keep growing past the lost file's: they are the upstream seq
    assert {m for _, m, _ in rows[-11:-1]} == set(list(bodies)[2000:])  # the WAL's commits were read


def test_damage_at_rest_after_a_clean_shutdown_is_caught_while_opening(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    bodies = _fill(path)
    _damage(path, _outbox_table_pages(path)[10:12])
    with Outbox(path) as recovered:
        stats = recovered.stats()
        assert stats.corruption_events == 1
        assert "integrity check" not in stats.last_corruption.cause  # skipped: the shutdown was clean
        rows = drain(recovered)
    assert 0 < len(rows) < len(bodies)
    assert all(bodies[msg_id] == body for _, msg_id, body in rows)


def test_unopenable_path_is_an_error_not_corruption(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.mkdir()
    with pytest.raises(OutboxError, match="cannot be opened"):
        Outbox(path)
    assert path.is_dir() and list(tmp_path.glob("outbox.db.corrupt*")) == []


def _fill_until_refused(store: Outbox, limit: int = 20_000) -> tuple[list[str], OutboxError]:
    stored = []
    for i in range(limit):
        try:
            stored.append(store.enqueue("audit", padded(i, 1000)))
        except OutboxError as exc:
            return stored, exc
    raise AssertionError("never ran out of space")


def test_database_size_ceiling_refuses_writes_keeps_rows_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, OutboxSettings(max_file_bytes=256 * 1024)) as store:
        stored, error = _fill_until_refused(store)
        assert "disk full (or max_file_bytes reached)" in str(error)
        stats = store.stats()
        assert stats.messages == len(stored) and stats.write_errors == 1
        # Delivering frees pages inside the file: writing works again with no restart.
        in_flight = store.claim_batch(30)
        store.mark_delivered(r.id for r in in_flight)
        again = store.enqueue("audit", padded(-1, 1000))
    with Outbox(path) as reopened:
        remaining = [m for _, m, _ in drain(reopened)]
    assert remaining == stored[30:] + [again]


def test_full_disk_refuses_writes_clearly_keeps_rows_and_resumes(small_filesystem: Path) -> None:
    # Other files leave the outbox about 1.5 MiB; freeing them later leaves room to checkpoint the WAL too.
    filler = small_filesystem / "other-files"
    filler.write_bytes(b"\0" * 6656 * 1024)
    path = small_filesystem / "outbox.db"
    store = Outbox(path, OutboxSettings(reserve_bytes=256 * 1024))
    stored, error = _fill_until_refused(store)
    assert "disk full" in str(error) and "kept" in str(error)
    assert len(stored) > 50
    assert store.stats().messages == len(stored)
    filler.unlink()
    after = [store.enqueue("audit", padded(-i, 1000)) for i in range(1, 20)]
    store.close()
    with Outbox(path) as reopened:
        assert [m for _, m, _ in drain(reopened)] == stored + after


_WRITER = """
import json, sys, threading
from pathlib import Path
from agent.upstream.outbox import Outbox

store = Outbox(Path(sys.argv[1]))
tag = sys.argv[2]
lock = threading.Lock()

def say(word, msg_id):
    with lock:
        sys.stdout.write(f"{word} {msg_id}\\n")
        sys.stdout.flush()

def write(n):
    i = 0
    while True:
        msg_id = f"{tag}-{n}-{i}"
        say("try", msg_id)
        store.enqueue("res" if n % 2 else "telemetry", json.dumps({"n": n, "i": i}).encode(), msg_id=msg_id)
        say("ok", msg_id)
        i += 1

for n in range(4):
    threading.Thread(target=write, args=(n,), daemon=True).start()
while True:
    batch = store.claim_batch(16)
    for record in batch:
        say("sent", record.msg_id)  # as the uplink publishes before it can get a PUBACK
    if batch:
        store.mark_delivered(r.id for r in batch)
        for record in batch:
            say("del", record.msg_id)
"""


def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    rng = random.Random(20240611)
    log: list[tuple[str, str]] = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for run in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), f"r{run}"], stdout=subprocess.PIPE, cwd=REPO, env=env
        )
        assert proc.stdout is not None
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.0, 0.4))  # may land in imports, opening, migration or the first writes
            lines: list[bytes] = []
        else:
            lines = [proc.stdout.readline() for _ in range(rng.randint(1, 600))]
        proc.send_signal(signal.SIGKILL)
        lines += proc.stdout.readlines()
        proc.wait()
        log += [tuple(line.decode().split()) for line in lines if line.strip()]  # type: ignore[misc]
    with Outbox(path) as store:
        remaining = {m for _, m, _ in drain(store)}
        assert store.stats().corruption_events == 0
    attempted = {m for word, m in log if word == "try"}
    acknowledged = {m for word, m in log if word == "ok"}
    sent = {m for word, m in log if word == "sent"}
    deleted = {m for word, m in log if word == "del"}
    assert acknowledged, "the writers never got going"
    assert acknowledged <= sent | remaining, "an acknowledged message was lost"
    assert sent | remaining <= attempted
    assert not deleted & remaining, "a durably deleted row came back"
    deleted_at = {m: i for i, (word, m) in enumerate(log) if word == "del"}
    resent = [m for i, (word, m) in enumerate(log) if word == "sent" and i > deleted_at.get(m, len(log))]
    assert not resent, "a row was handed out again after its delivery was recorded"

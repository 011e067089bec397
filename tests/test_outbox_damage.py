"""Damage SQLite itself passes over in silence: a zero-length database, a garbage or cut-short -wal. Each is a
corruption event (files moved aside as found, counted, logged) and every row still readable is salvaged."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.app import Agent
from agent.mqtt.localbroker import MosquittoProcess
from agent.upstream.outbox import Outbox
from agent.upstream.outbox_wal import wal_damage
from tests.test_outbox_faults import drain, padded

FRAME = 24 + 4096


def _crashed_copy(tmp_path: Path, rows: int, in_main_file: int = 0) -> tuple[Path, dict[str, bytes]]:
    """An outbox as a power cut leaves it: ``in_main_file`` rows checkpointed (a clean close), the rest only in
    the -wal."""
    live = tmp_path / "live" / "outbox.db"
    with Outbox(live) as store:
        bodies = {store.enqueue("res", padded(i)): padded(i) for i in range(in_main_file)}
    store = Outbox(live)
    bodies.update({store.enqueue("res", padded(i)): padded(i) for i in range(in_main_file, rows)})
    crashed = tmp_path / "crashed" / "outbox.db"
    crashed.parent.mkdir()
    shutil.copyfile(live, crashed)
    shutil.copyfile(f"{live}-wal", f"{crashed}-wal")
    store.close()
    return crashed, bodies


def _recovered(path: Path) -> tuple[list[tuple[int, str, bytes]], str, int, Path]:
    evidence = {suffix: Path(f"{path}{suffix}").read_bytes() for suffix in ("", "-wal") if Path(f"{path}{suffix}").exists()}
    with Outbox(path) as store:
        stats = store.stats()
        assert stats.corruption_events == 1 and stats.last_corruption is not None
        rows = drain(store)
    (moved,) = path.parent.glob("outbox.db.corrupt-*[0-9Z]")
    for suffix, content in evidence.items():  # kept as found, for recovery by hand
        assert Path(f"{moved}{suffix}").read_bytes() == content
    return rows, stats.last_corruption.cause, stats.last_corruption.rows_salvaged, moved


def test_a_zero_length_database_is_a_corruption_event(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.touch()
    rows, cause, salvaged, _ = _recovered(path)
    assert "zero length" in cause and salvaged == 0 and rows == []


def test_a_zero_length_database_beside_its_wal_gives_back_the_wals_committed_rows(tmp_path: Path) -> None:
    crashed, bodies = _crashed_copy(tmp_path, 40)
    crashed.write_bytes(b"")  # the main file lost; the -wal still holds every commit since the last checkpoint
    rows, cause, salvaged, _ = _recovered(crashed)
    assert "zero length" in cause
    assert salvaged == len(bodies) and {msg_id: body for _, msg_id, body in rows} == bodies


@pytest.mark.parametrize("garbage", [b"\x00" * 7, b"not a write-ahead log " * 500], ids=["short", "long"])
def test_a_garbage_wal_is_a_corruption_event_and_the_main_file_is_salvaged(tmp_path: Path, garbage: bytes) -> None:
    crashed, bodies = _crashed_copy(tmp_path, 40, in_main_file=25)
    Path(f"{crashed}-wal").write_bytes(garbage)
    rows, cause, salvaged, _ = _recovered(crashed)
    assert "-wal" in cause
    # The -wal's 15 rows are beyond SQLite (the moved-aside copy keeps them); the main file's are all back.
    assert salvaged == 25 and {msg_id: body for _, msg_id, body in rows} == dict(list(bodies.items())[:25])


def test_a_wal_cut_short_inside_a_frame_is_a_corruption_event_and_its_complete_commits_are_salvaged(
    tmp_path: Path,
) -> None:
    crashed, bodies = _crashed_copy(tmp_path, 40, in_main_file=10)
    wal = Path(f"{crashed}-wal")
    assert wal_damage(wal) is None
    with open(wal, "r+b") as handle:
        handle.truncate(32 + 20 * FRAME + 1000)
    assert "cut short" in (wal_damage(wal) or "")
    rows, cause, salvaged, _ = _recovered(crashed)
    assert "cut short" in cause
    assert 10 < salvaged < len(bodies) and all(bodies[msg_id] == body for _, msg_id, body in rows)
    assert [msg_id for _, msg_id, _ in rows] == list(bodies)[: len(rows)]  # the oldest rows, none skipped


def test_an_append_interrupted_between_a_frame_header_and_its_page_is_no_damage(tmp_path: Path) -> None:
    crashed, bodies = _crashed_copy(tmp_path, 10)
    wal = Path(f"{crashed}-wal")
    frames = (wal.stat().st_size - 32) // FRAME
    with open(wal, "r+b") as handle:
        handle.seek(32 + (frames - 1) * FRAME)
        header = handle.read(24)
        handle.seek(32 + frames * FRAME)
        handle.write(header)  # a header with this generation's salts, its page never written
    assert wal_damage(wal) is None
    with Outbox(crashed) as store:
        assert store.stats().corruption_events == 0
        assert {msg_id: body for _, msg_id, body in drain(store)} == bodies


def test_the_agent_audits_and_counts_a_corrupt_outbox_found_at_start(
    tmp_path: Path, start_agent: Callable[..., Agent], cloud_broker: MosquittoProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "outbox.db").touch()  # found while the outbox opens, before anyone could listen
    cloud = {"host": cloud_broker.host, "port": cloud_broker.port}
    with caplog.at_level(logging.ERROR, logger="agent.observe.audit"):
        agent = start_agent(cloud=cloud)
    (record,) = [r for r in caplog.records if getattr(r, "audit", {}).get("kind") == "outbox_corrupt"]
    assert record.audit["detail"]["rows_salvaged"] == 0 and "zero length" in record.audit["detail"]["cause"]
    assert agent.metrics is not None
    assert agent.metrics.registry.get_sample_value("edge_agent_outbox_corruption_events_total") == 1

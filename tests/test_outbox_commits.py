"""The outbox's group commit as the request path uses it: callbacks instead of futures, many appends in one
statement, and which rows a transaction takes (real SQLite files)."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from agent.config import OutboxSettings
from agent.errors import OutboxError
from agent.upstream.outbox import Outbox

TIMEOUT_S = 30.0


def body(**values: object) -> bytes:
    return json.dumps(values).encode()


class Settled:
    """Records ``enqueue_then`` callbacks in the order the writer ran them."""

    def __init__(self) -> None:
        self.order: list[tuple[str, OutboxError | None]] = []
        self._cond = threading.Condition()

    def then(self, name: str):
        def settle(error: OutboxError | None) -> None:
            with self._cond:
                self.order.append((name, error))
                self._cond.notify_all()

        return settle

    def wait_for(self, count: int) -> list[tuple[str, OutboxError | None]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.order) >= count, TIMEOUT_S), self.order
            return list(self.order)


def stored_rows(path: Path) -> list[tuple[int, str, bytes]]:
    """(id, cls, body) of every row, read through a separate SQLite connection (what is on disk)."""
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, cls, body FROM outbox ORDER BY id").fetchall()


def hold_writer(store: Outbox) -> tuple[threading.Event, threading.Event]:
    """Block the writer thread inside a commit callback; returns (held, release)."""
    held, release = threading.Event(), threading.Event()

    def block(error: OutboxError | None) -> None:
        held.set()
        release.wait(TIMEOUT_S)

    store.enqueue_then("telemetry", body(hold=True), source="holder", then=block)
    assert held.wait(TIMEOUT_S)
    return held, release


def test_enqueue_then_calls_back_once_the_row_is_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    seen_on_disk: list[list[bytes]] = []
    done = threading.Event()

    def settle(error: OutboxError | None) -> None:
        assert error is None
        seen_on_disk.append([row[2] for row in stored_rows(path)])
        done.set()

    with Outbox(path) as store:
        store.enqueue_then("res", body(reply=1), source="client-a", then=settle)
        assert done.wait(TIMEOUT_S)
    assert seen_on_disk == [[body(reply=1)]]


def test_appends_committed_together_keep_their_own_ids_and_refusals(tmp_path: Path) -> None:
    """Rows of many callers go in with one statement; each caller still learns its own outcome, a row too
    large for the store is refused alone, and ids follow the order the rows were taken in."""
    path = tmp_path / "outbox.db"
    settled = Settled()
    with Outbox(path, OutboxSettings(max_bytes=4096)) as store:
        _, release = hold_writer(store)
        names = [f"row-{i}" for i in range(20)]
        for index, name in enumerate(names):
            payload = body(pad="x" * 5000) if index == 7 else body(name=name)
            store.enqueue_then("res", payload, source="one-client", then=settled.then(name))
        release.set()
        order = settled.wait_for(len(names))
    assert [name for name, _ in order] == names
    assert [name for name, error in order if error is not None] == ["row-7"]
    rows = [json.loads(row[2]) for row in stored_rows(path) if row[1] == "res"]
    assert [row["name"] for row in rows] == [name for name in names if name != "row-7"]


def test_enqueue_then_on_a_closed_outbox_calls_back_with_the_error(tmp_path: Path) -> None:
    store = Outbox(tmp_path / "outbox.db")
    store.close()
    errors: list[OutboxError | None] = []
    store.enqueue_then("res", body(late=True), source="client-a", then=errors.append)
    assert len(errors) == 1 and isinstance(errors[0], OutboxError)


def test_a_failing_callback_does_not_cost_the_others_their_answer(tmp_path: Path) -> None:
    settled = Settled()

    def broken(error: OutboxError | None) -> None:
        raise RuntimeError("a bug in a reply callback")

    with Outbox(tmp_path / "outbox.db") as store:
        _, release = hold_writer(store)
        store.enqueue_then("res", body(i=1), source="a", then=broken)
        store.enqueue_then("res", body(i=2), source="a", then=settled.then("second"))
        release.set()
        assert settled.wait_for(1) == [("second", None)]
        assert store.stats().messages == 3

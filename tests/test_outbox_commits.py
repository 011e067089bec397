"""The outbox's group commit as the request path uses it: callbacks instead of futures, many appends in one
statement, and which rows a transaction takes (real SQLite files)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from agent.config import OutboxSettings
from agent.errors import OutboxError
from agent.upstream.outbox import Outbox
from agent.upstream.outbox_commands import APPEND, Command, fair_transaction
from agent.upstream import outbox_sql
from agent.upstream.outbox_sql import ROWS_PER_INSERT, SQL_CHUNK, insert_sizes
from agent.upstream.outbox_writer import _transactions

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


@given(st.integers(min_value=0, max_value=5 * ROWS_PER_INSERT))
def test_a_transactions_rows_go_in_through_few_distinct_statements(count: int) -> None:
    """Every row is inserted once, in order, by statements of a few sizes only: each distinct size is one more
    prepared statement the connection keeps in its cache (SQLite memory held after a burst)."""
    sizes = insert_sizes(count)
    assert sum(sizes) == count
    assert all(size in {ROWS_PER_INSERT >> shift for shift in range(8)} for size in sizes)
    assert len(sizes) - sizes.count(ROWS_PER_INSERT) <= 7


@given(st.lists(st.integers(min_value=1), min_size=0, max_size=SQL_CHUNK, unique=True))
def test_id_lists_are_padded_to_a_few_lengths_with_the_same_ids(ids: list[int]) -> None:
    """Claims and deliveries pass their ids in ``IN`` lists padded to powers of two: as with the inserts, each
    distinct length is one more prepared statement kept in the connection's cache."""
    padded = outbox_sql.padded(ids)
    assert padded[: len(ids)] == ids and set(padded) == set(ids)
    assert len(padded) in {0} | {1 << shift for shift in range(SQL_CHUNK.bit_length())}
    assert len(padded) < 2 * len(ids) or len(ids) <= 1


def test_padded_claims_and_deliveries_act_on_each_row_once(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", OutboxSettings()) as store:
        for n in range(8):
            store.enqueue("res", body(n=n))
        first = store.claim_batch(3)  # an IN list of 3 ids, padded to 4 with the third repeated
        second = store.claim_batch(5)  # ...of 5, padded to 8
        assert [r.attempts for r in first + second] == [1] * 8
        assert len({r.id for r in first + second}) == 8
        assert store.mark_delivered([r.id for r in second]) == 5
        assert store.release_claims([r.id for r in first]) == 3
        assert [r.attempts for r in store.claim_batch(8)] == [2, 2, 2]
    assert len(stored_rows(tmp_path / "outbox.db")) == 3


def test_rows_of_one_transaction_split_over_statements_keep_their_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    settled = Settled()
    names = [f"row-{i}" for i in range(ROWS_PER_INSERT + 99)]  # 128 + 64 + 32 + 2 + 1
    with Outbox(path, OutboxSettings(batch_max=len(names))) as store:
        _, release = hold_writer(store)
        for name in names:
            store.enqueue_then("res", body(name=name), source="one-client", then=settled.then(name))
        release.set()
        order = settled.wait_for(len(names))
    assert [name for name, error in order if error is None] == names
    rows = [json.loads(row[2]) for row in stored_rows(path) if row[1] == "res"]
    assert [row["name"] for row in rows] == names


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


def test_a_light_clients_row_is_not_committed_behind_a_floods_backlog(tmp_path: Path) -> None:
    """While the writer is busy, a flood queues hundreds of rows, then a paced client queues one: the paced
    row goes into the very next transaction, and its callback (where its reply is published) runs before
    the flood's rows beyond that transaction's share."""
    path = tmp_path / "outbox.db"
    settled = Settled()
    per_transaction = 16
    with Outbox(path, OutboxSettings(batch_max=per_transaction)) as store:
        _, release = hold_writer(store)
        for index in range(300):
            store.enqueue_then("res", body(flood=index), source="flood", then=settled.then(f"flood-{index}"))
        store.enqueue_then("res", body(paced=0), source="paced", then=settled.then("paced"))
        release.set()
        order = [name for name, _ in settled.wait_for(301)]
    assert order.index("paced") < per_transaction
    flood = [name for name in order if name != "paced"]
    assert flood == [f"flood-{index}" for index in range(300)]
    # A client's own rows keep their order on disk too (ids increase with arrival within a source).
    stored = [json.loads(row[2]) for row in stored_rows(path) if row[1] == "res"]
    assert [row["flood"] for row in stored if "flood" in row] == list(range(300))


def test_every_waiting_source_gets_a_row_into_the_next_transaction(tmp_path: Path) -> None:
    settled = Settled()
    with Outbox(tmp_path / "outbox.db", OutboxSettings(batch_max=8)) as store:
        _, release = hold_writer(store)
        for index in range(50):
            store.enqueue_then("res", body(a=index), source="a", then=settled.then(f"a-{index}"))
            store.enqueue_then("res", body(b=index), source="b", then=settled.then(f"b-{index}"))
        for source in ("c", "d", "e"):
            store.enqueue_then("res", body(source=source), source=source, then=settled.then(source))
        release.set()
        order = [name for name, _ in settled.wait_for(103)]
    assert {"c", "d", "e"} <= set(order[:8])


@given(
    st.lists(st.tuples(st.sampled_from(["enqueue", "claim", "delivered"]), st.sampled_from("abcd"), st.integers(1, 3))),
    st.integers(1, 20),
)
def test_fair_transaction_takes_each_command_once_in_source_order_within_the_row_bound(
    specs: list[tuple[str, str, int]], max_rows: int
) -> None:
    waiting = [Command(op, (), source=source, rows=rows if op == APPEND else 0) for op, source, rows in specs]
    now, later = fair_transaction(waiting, max_rows)
    assert sorted(map(id, now + later)) == sorted(map(id, waiting))
    assert all(command.op == APPEND for command in later)
    taken = [command for command in now if command.op == APPEND]
    total = sum(c.rows for c in taken)
    assert total <= max_rows or len(taken) == 1
    for source in "abcd":
        mine = [c for c in waiting if c.op == APPEND and c.source == source]
        assert [c for c in taken if c.source == source] + [c for c in later if c.source == source] == mine
        # A source with rows waiting is left out only when its next command did not fit any more.
        if mine and not any(c.source == source for c in taken):
            assert total + mine[0].rows > max_rows


@given(st.lists(st.sampled_from(["enqueue", "claim", "delivered", "release", "failed", "maintain"])))
def test_new_rows_commit_apart_from_the_uplinks_unsynced_operations_only(ops: list[str]) -> None:
    """A batch runs as one transaction, except new rows beside only claims, releases and deliveries: those
    follow in a transaction of their own, so the replies of the new rows wait for none of them."""
    writes = [Command(op, ()) for op in ops]
    transactions = _transactions(writes)
    others = {op for op in ops if op != APPEND}
    if APPEND in ops and others and others <= {"claim", "delivered", "release"}:
        assert transactions == [[c for c in writes if c.op == APPEND], [c for c in writes if c.op != APPEND]]
    else:
        assert transactions == ([writes] if writes else [])


def test_the_callbacks_of_one_commit_run_inside_one_scope_block(tmp_path: Path) -> None:
    """The local link publishes the replies of one commit together (one wake-up of its network thread)."""
    blocks: list[list[str]] = []
    current: list[str] | None = None

    @contextlib.contextmanager
    def scope():
        nonlocal current
        current = []
        yield
        blocks.append(current)
        current = None

    def inside(name: str):
        def settle(error: OutboxError | None) -> None:
            assert current is not None, "a callback ran outside the scope"
            current.append(name)

        return settle

    settled = Settled()
    with Outbox(tmp_path / "outbox.db") as store:
        _, release = hold_writer(store)
        store.run_callbacks_within(scope)
        for index in range(10):
            store.enqueue_then("res", body(i=index), source=f"client-{index % 3}", then=inside(f"row-{index}"))
        store.enqueue_then("res", body(last=True), source="client-0", then=settled.then("last"))
        release.set()
        settled.wait_for(1)
    assert sorted(name for block in blocks for name in block) == sorted(f"row-{index}" for index in range(10))
    assert len([block for block in blocks if block]) == 1

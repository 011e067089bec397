"""The outbox store on real SQLite files: durability, claims, ordering, dead letters, bounds, TTL, schema."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pydantic import ValidationError

from agent.config import MESSAGE_CLASSES, OutboxSettings
from agent.errors import OutboxError
from agent.upstream.outbox import SEND_ORDER, Outbox, OutboxItem
from agent.upstream.outbox_file import OutboxClock


def body(**values: object) -> bytes:
    return json.dumps(values).encode()


def drain(outbox: Outbox) -> list[tuple[int, str, str]]:
    """Claim and deliver everything; returns (id, msg_id, cls) in claim order."""
    delivered = []
    while batch := outbox.claim_batch(100):
        outbox.mark_delivered(r.id for r in batch)
        delivered += [(r.id, r.msg_id, r.cls) for r in batch]
    return delivered


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def outbox(tmp_path: Path):
    store = Outbox(tmp_path / "outbox.db")
    yield store
    store.close()


def test_enqueued_rows_survive_reopen_with_uuid7_ids(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as store:
        ids = [store.enqueue("res", body(i=i)) for i in range(5)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    with Outbox(tmp_path / "outbox.db") as store:
        assert [m for _, m, _ in drain(store)] == ids
        assert store.stats().delivered == 5
        assert store.stats().last_delivery_at is not None


def test_message_ids_are_distinct_uuid7_of_the_current_millisecond(tmp_path: Path) -> None:
    """Enough ids to draw random bits more than once; each says when it was made (UUIDv7, RFC 9562)."""
    before = time.time_ns() // 1_000_000
    with Outbox(tmp_path / "outbox.db") as store:
        ids = store.enqueue_many([OutboxItem(cls="telemetry", body=body(i=i)) for i in range(600)])
    after = time.time_ns() // 1_000_000
    parsed = [uuid.UUID(i) for i in ids]
    assert len(set(ids)) == len(ids) and all(str(u) == i for u, i in zip(parsed, ids))
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert all(before <= u.int >> 80 <= after for u in parsed)


def test_file_is_wal_with_schema_version(tmp_path: Path, outbox: Outbox) -> None:
    outbox.enqueue("audit", body(a=1))
    conn = sqlite3.connect(tmp_path / "outbox.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == outbox.stats().schema_version == 1
    conn.close()


def test_concurrent_enqueues_share_transactions_and_keep_per_thread_order(tmp_path: Path) -> None:
    store = Outbox(tmp_path / "outbox.db")
    # Hold the write lock from outside so the writer's first transaction waits; meanwhile all threads queue
    # up behind it and must then be committed together.
    blocker = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    started = threading.Barrier(11)
    per_thread: dict[int, list[str]] = defaultdict(list)

    def writer(n: int) -> None:
        started.wait()
        for i in range(20):
            per_thread[n].append(store.enqueue("res", body(thread=n, i=i)))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    started.wait()
    time.sleep(0.3)
    blocker.execute("COMMIT")
    blocker.close()
    for thread in threads:
        thread.join()
    stats = store.stats()
    assert stats.messages == 200
    assert stats.transactions < 200
    order = [m for _, m, _ in drain(store)]
    for ids in per_thread.values():
        assert [m for m in order if m in set(ids)] == ids
    store.close()


def test_enqueue_many_is_one_transaction(outbox: Outbox) -> None:
    before = outbox.stats().transactions
    ids = outbox.enqueue_many([OutboxItem(cls="telemetry", body=body(i=i)) for i in range(50)])
    assert outbox.stats().transactions == before + 1
    assert [m for _, m, _ in drain(outbox)] == ids


def test_body_must_be_json(outbox: Outbox) -> None:
    with pytest.raises(ValidationError):
        outbox.enqueue("res", b"not json {")


def test_claims_follow_class_priority_then_fifo_and_are_never_handed_out_twice(outbox: Outbox) -> None:
    enqueued = defaultdict(list)
    for i in range(12):
        cls = MESSAGE_CLASSES[i % 4]
        enqueued[cls].append(outbox.enqueue(cls, body(i=i)))
    first = outbox.claim_batch(5)
    assert [r.cls for r in first] == ["fallback", "fallback", "fallback", "res", "res"]
    second = outbox.claim_batch(100)
    assert not {r.id for r in first} & {r.id for r in second}
    claimed = first + second
    for cls in MESSAGE_CLASSES:
        assert [r.msg_id for r in claimed if r.cls == cls] == enqueued[cls]
    assert [r.cls for r in claimed] == sorted((r.cls for r in claimed), key=SEND_ORDER.index)
    assert outbox.claim_batch(10) == []
    assert outbox.stats().classes["res"].claimed == 3


def test_released_and_restarted_claims_come_back_first_in_order(tmp_path: Path) -> None:
    store = Outbox(tmp_path / "outbox.db")
    ids = [store.enqueue("res", body(i=i)) for i in range(10)]
    head = store.claim_batch(4)
    store.mark_delivered([head[0].id])
    assert store.release_claims([head[1].id]) == 1
    assert [r.msg_id for r in store.claim_batch(1)] == [ids[1]]
    store.close()
    with Outbox(tmp_path / "outbox.db") as reopened:
        assert reopened.stats().classes["res"].claimed == 0
        again = reopened.claim_batch(100)
        assert [r.msg_id for r in again] == ids[1:]
        assert again[0].attempts == 3  # claimed before the release, after it, and now


def test_delivering_unknown_or_repeated_ids_is_harmless(outbox: Outbox) -> None:
    outbox.enqueue("res", body())
    (record,) = outbox.claim_batch(1)
    assert outbox.mark_delivered([record.id, 9999]) == 1
    assert outbox.mark_delivered([record.id]) == 0
    assert outbox.stats().delivered == 1


def test_refused_rows_are_dead_lettered_retried_then_parked(tmp_path: Path) -> None:
    policy = OutboxSettings(dead_letter_retry_s=0.05, dead_letter_retry_max_s=0.1, dead_letter_max_attempts=2)
    with Outbox(tmp_path / "outbox.db", policy) as store:
        msg_id = store.enqueue("audit", body(event="x"))
        (record,) = store.claim_batch(1)
        store.mark_failed(record.id, 0x87)
        stats = store.stats()
        assert stats.dead == 1 and stats.dead_lettered == {"audit": 1}
        (entry,) = store.peek(state="dead")
        assert (entry.msg_id, entry.last_reason, entry.failures) == (msg_id, 0x87, 1)
        retried: list = []
        wait_until(lambda: retried.extend(store.claim_batch(1)) or retried)
        assert retried[0].msg_id == msg_id
        store.mark_failed(retried[0].id, 0x97)
        assert store.peek(state="dead")[0].failures == 2
        time.sleep(0.3)  # past every retry delay: a parked row must not come back on its own
        assert store.claim_batch(1) == []
        assert store.retry_dead() == 1
        assert [r.msg_id for r in store.claim_batch(1)] == [msg_id]


def test_capacity_drops_telemetry_first_oldest_first_and_counts_it(tmp_path: Path) -> None:
    with Outbox(tmp_path / "small.db", OutboxSettings(max_messages=10)) as store:
        telemetry = [store.enqueue("telemetry", body(t=i)) for i in range(6)]
        audit = [store.enqueue("audit", body(a=i)) for i in range(4)]
        res = [store.enqueue("res", body(r=i)) for i in range(3)]
        stats = store.stats()
        assert stats.messages == 10
        assert stats.drops == {"capacity": {"telemetry": 3}}
        kept = {m for _, m, _ in drain(store)}
        assert kept == set(telemetry[3:] + audit + res)


def test_new_low_priority_message_is_refused_when_only_higher_classes_remain(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", OutboxSettings(max_messages=3)) as store:
        audit = [store.enqueue("audit", body(a=i)) for i in range(3)]
        with pytest.raises(OutboxError, match="not stored"):
            store.enqueue("telemetry", body(t=1))
        newest = store.enqueue("audit", body(a=3))
        assert store.stats().drops == {"capacity": {"telemetry": 1, "audit": 1}}
        assert [m for _, m, _ in drain(store)] == audit[1:] + [newest]


def test_max_bytes_bounds_bodies_and_refuses_oversized_ones(tmp_path: Path) -> None:
    limits = OutboxSettings(max_bytes=4096)
    with Outbox(tmp_path / "outbox.db", limits) as store:
        with pytest.raises(OutboxError):
            store.enqueue("res", json.dumps("x" * 5000).encode())
        for i in range(20):
            store.enqueue("res", json.dumps({"i": i, "pad": "x" * 400}).encode())
        stats = store.stats()
        assert stats.bytes <= 4096
        assert stats.drops["too_large"] == {"res": 1}
        assert stats.drops["capacity"]["res"] == 20 - stats.messages


def test_rows_in_flight_are_never_evicted_and_do_not_count_against_bounds(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", OutboxSettings(max_messages=2)) as store:
        first = [store.enqueue("telemetry", body(i=i)) for i in range(2)]
        in_flight = store.claim_batch(2)
        later = [store.enqueue("telemetry", body(i=i)) for i in range(2, 5)]
        stats = store.stats()
        assert (stats.messages, stats.drops) == (4, {"capacity": {"telemetry": 1}})
        store.mark_failed(in_flight[0].id, 0x87)  # dead rows count again, and go first within their class
        store.enqueue("audit", body())
        assert [r.msg_id for r in in_flight] == first
        store.mark_delivered([in_flight[1].id])
        assert [m for _, m, _ in drain(store)][1:] == later[2:]


def test_ttl_expires_unclaimed_rows_and_counts_them(tmp_path: Path) -> None:
    limits = OutboxSettings(ttl_s={"telemetry": 0.05})
    with Outbox(tmp_path / "outbox.db", limits) as store:
        store.enqueue("telemetry", body(t=1))
        store.enqueue("res", body(r=1), ttl_s=0.05)
        kept = store.enqueue("res", body(r=2))
        long_lived = store.enqueue("telemetry", body(t=2), ttl_s=3600)
        time.sleep(0.1)
        claimed = store.claim_batch(10)
        assert [r.msg_id for r in claimed] == [kept, long_lived]
        assert claimed[0].remaining_ttl_s is None
        assert 3500 < claimed[1].remaining_ttl_s <= 3600
        assert store.stats().drops == {"expired": {"telemetry": 1, "res": 1}}


class JumpingWallClock(OutboxClock):
    """The wall clock of a Pi at NTP sync: a year ahead of what it said at boot."""

    def wall(self) -> float:
        return super().wall() + 365 * 86400


def test_wall_clock_jump_does_not_expire_anything(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", OutboxSettings(ttl_s={"res": 60})) as store:
        msg_id = store.enqueue("res", body())
    with Outbox(tmp_path / "outbox.db", clock=JumpingWallClock()) as store:
        (record,) = store.claim_batch(1)
        assert record.msg_id == msg_id
        assert 50 < record.remaining_ttl_s <= 60


class NextBootClock(OutboxClock):
    """A later boot: another boot id, and a boot clock that restarted near zero."""

    def boot_id(self) -> str:
        return "a-later-boot"

    def now(self) -> float:
        return super().now() - self.offset

    offset = 0.0


def test_ttl_counts_running_time_across_a_reboot_not_downtime(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", OutboxSettings(ttl_s={"telemetry": 100})) as store:
        store.enqueue("telemetry", body())
    conn = sqlite3.connect(tmp_path / "outbox.db")
    (last_seen,) = conn.execute("SELECT value FROM meta WHERE key = 'boot_clock'").fetchone()
    # The old boot ran 30 s past the enqueue before the power went.
    conn.execute("UPDATE meta SET value = ? WHERE key = 'boot_clock'", (repr(float(last_seen) + 30),))
    conn.commit()
    conn.close()
    clock = NextBootClock()
    clock.offset = OutboxClock().now() - 5.0  # the new boot is 5 s old
    with Outbox(tmp_path / "outbox.db", clock=clock) as store:
        (record,) = store.claim_batch(1)
        assert 65 < record.remaining_ttl_s <= 70
        assert 30 <= record.age_s < 35


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as store:
        store.enqueue("res", body())
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(OutboxError, match="newer"):
        Outbox(path)
    assert path.read_bytes() == before
    assert list(tmp_path.glob("outbox.db.corrupt*")) == []


def test_one_writer_at_a_time_and_a_read_only_view_alongside(tmp_path: Path, outbox: Outbox) -> None:
    outbox.enqueue("res", body(x=1))
    outbox.claim_batch(1)
    with pytest.raises(OutboxError, match="in use"):
        Outbox(tmp_path / "outbox.db")
    viewer = Outbox(tmp_path / "outbox.db", read_only=True)
    assert viewer.stats().classes["res"].claimed == 1  # the viewer released nothing
    assert viewer.peek(1)[0].preview == '{"x": 1}'
    with pytest.raises(OutboxError, match="read-only"):
        viewer.enqueue("res", body())
    viewer.close()
    with pytest.raises(OutboxError, match="no outbox"):
        Outbox(tmp_path / "missing.db", read_only=True)


def test_closed_outbox_refuses_calls(tmp_path: Path) -> None:
    store = Outbox(tmp_path / "outbox.db")
    store.close()
    with pytest.raises(OutboxError, match="closed"):
        store.enqueue("res", body())


def test_listener_hears_of_new_and_released_rows(outbox: Outbox) -> None:
    calls = []
    outbox.add_queued_listener(lambda: calls.append(1))
    outbox.enqueue("res", body())
    outbox.claim_batch(1)
    assert len(calls) == 1
    outbox.release_claims()
    assert len(calls) == 2


class OutboxMachine(RuleBasedStateMachine):
    """Any interleaving of enqueue, claim, ack, refusal, release, power cut and restart loses nothing,
    and every class is handed out in enqueue order."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-sm-"))
        self.generation = 0
        self.store = Outbox(self._path(), self._settings())
        self.queued: dict[str, list[str]] = {cls: [] for cls in MESSAGE_CLASSES}  # enqueue order
        self.claimed: dict[int, tuple[str, str]] = {}  # row id -> (msg_id, cls)
        self.dead: dict[int, tuple[str, str]] = {}
        self.enqueue_order: dict[str, int] = {}
        self.delivered: set[str] = set()
        self.acknowledged: set[str] = set()

    def _path(self) -> Path:
        return self.dir / f"outbox-{self.generation}.db"

    @staticmethod
    def _settings() -> OutboxSettings:
        return OutboxSettings(ttl_s={}, dead_letter_retry_s=3600, max_messages=100_000)

    def _requeue(self, rows: dict[int, tuple[str, str]]) -> None:
        for msg_id, cls in rows.values():
            self.queued[cls].append(msg_id)
            self.queued[cls].sort(key=self.enqueue_order.__getitem__)
        rows.clear()

    @rule(cls=st.sampled_from(MESSAGE_CLASSES), count=st.integers(1, 4))
    def enqueue(self, cls: str, count: int) -> None:
        items = [OutboxItem(cls=cls, body=body(n=len(self.enqueue_order) + i)) for i in range(count)]
        for msg_id in self.store.enqueue_many(items):
            self.enqueue_order[msg_id] = len(self.enqueue_order)
            self.queued[cls].append(msg_id)
            self.acknowledged.add(msg_id)

    @rule(limit=st.integers(1, 8))
    def claim(self, limit: int) -> None:
        records = self.store.claim_batch(limit)
        expected = [m for cls in SEND_ORDER for m in self.queued[cls]][:limit]
        assert [r.msg_id for r in records] == expected
        for record in records:
            self.queued[record.cls].remove(record.msg_id)
            self.claimed[record.id] = (record.msg_id, record.cls)

    @precondition(lambda self: self.claimed)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        ids = data.draw(st.sets(st.sampled_from(sorted(self.claimed)), min_size=1))
        assert self.store.mark_delivered(ids) == len(ids)
        for row_id in ids:
            self.delivered.add(self.claimed.pop(row_id)[0])

    @precondition(lambda self: self.claimed)
    @rule(data=st.data())
    def refuse(self, data: st.DataObject) -> None:
        row_id = data.draw(st.sampled_from(sorted(self.claimed)))
        self.store.mark_failed(row_id, 0x87)
        self.dead[row_id] = self.claimed.pop(row_id)

    @rule()
    def release(self) -> None:
        assert self.store.release_claims() == len(self.claimed)
        self._requeue(self.claimed)

    @rule()
    def retry_dead(self) -> None:
        assert self.store.retry_dead() == len(self.dead)
        self._requeue(self.dead)

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = Outbox(self._path(), self._settings())
        self._requeue(self.claimed)

    @rule()
    def power_cut(self) -> None:
        # Every call has returned, so the files hold exactly what a machine losing power now would keep:
        # copy them (no -shm, as after a reboot) and carry on with the copy.
        old = self._path()
        self.generation += 1
        for suffix in ("", "-wal"):
            if Path(f"{old}{suffix}").exists():
                shutil.copyfile(f"{old}{suffix}", f"{self._path()}{suffix}")
        self.store.close()
        self.store = Outbox(self._path(), self._settings())
        self._requeue(self.claimed)

    @invariant()
    def counts_match(self) -> None:
        stats = self.store.stats()
        for cls in MESSAGE_CLASSES:
            assert stats.classes[cls].queued == len(self.queued[cls])
        assert sum(c.claimed for c in stats.classes.values()) == len(self.claimed)
        assert stats.dead == len(self.dead)
        assert not stats.drops

    def teardown(self) -> None:
        try:
            self.store.retry_dead()
            self.store.release_claims()
            remaining = [m for _, m, _ in drain(self.store)]
            assert not set(remaining) & self.delivered
            assert self.delivered | set(remaining) == self.acknowledged
            self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


OutboxMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestOutboxMachine = OutboxMachine.TestCase

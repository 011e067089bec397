"""The inference gate hands a freed slot to the longest waiter: a thread that releases and asks again at once
cannot take the slot back from one already waiting (threading.Semaphore lets it, and starved a caller)."""

from __future__ import annotations

import threading
import time

import pytest

from agent.models.gate import FairGate


def _wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def test_a_released_slot_goes_to_the_waiter_not_back_to_the_releaser() -> None:
    gate = FairGate(1)
    gate.acquire()
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (gate.acquire(), got.set()))
    waiter.start()
    _wait_until(lambda: gate.waiting == 1)
    gate.release()
    assert not gate.acquire(blocking=False), "the releasing thread took the slot back from the waiter"
    assert got.wait(10)
    gate.release()
    waiter.join(10)
    assert gate.acquire(blocking=False)


def test_waiters_are_served_in_arrival_order() -> None:
    gate = FairGate(2)
    gate.acquire()
    gate.acquire()
    order: list[int] = []
    threads = []
    for index in range(5):
        thread = threading.Thread(target=lambda index=index: (gate.acquire(), order.append(index), gate.release()))
        thread.start()
        threads.append(thread)
        _wait_until(lambda index=index: gate.waiting == index + 1)
    gate.release()
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2, 3, 4]
    gate.release()
    assert gate.acquire(blocking=False) and gate.acquire(blocking=False) and not gate.acquire(blocking=False)


def test_more_callers_than_slots_all_make_progress() -> None:
    gate = FairGate(2)
    counts = [0, 0, 0]
    stop = threading.Event()

    def hammer(index: int) -> None:
        while not stop.is_set():
            with gate:
                # An inference releases the GIL while it runs, as this does.
                time.sleep(0.0001)
                counts[index] += 1

    threads = [threading.Thread(target=hammer, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    _wait_until(lambda: sum(counts) >= 3_000, timeout=60)
    stop.set()
    for thread in threads:
        thread.join(10)
    # FIFO hand-over makes the callers take turns; a barging semaphore let one get almost nothing.
    assert min(counts) >= sum(counts) // 10, counts


def test_releasing_more_than_acquired_is_a_bug_reported_at_once() -> None:
    gate = FairGate(1)
    with pytest.raises(ValueError, match="released more often"):
        gate.release()
    with pytest.raises(ValueError):
        FairGate(0)

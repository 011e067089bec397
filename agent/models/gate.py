"""The inference gate: at most N inferences at once, and a freed slot goes to the thread that waited longest.

``threading.Semaphore`` lets the thread that just released a slot take it straight back before the waiter it
woke gets the GIL; with more callers than slots (two workers plus the network thread serving inline, against
two slots) one caller was measured getting 4 inferences while the other two got 16,000 in two seconds. Handing
the slot to the oldest waiter on release makes waiting bounded by the requests ahead of it.
"""

from __future__ import annotations

import threading
from collections import deque


class FairGate:
    """A counting semaphore that hands each freed slot directly to the longest waiter (FIFO)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a gate needs at least one slot, not {slots}")
        self._lock = threading.Lock()
        self._slots = slots
        self._free = slots
        self._waiters: deque[threading.Lock] = deque()

    @property
    def waiting(self) -> int:
        """Threads waiting for a slot now."""
        return len(self._waiters)

    def acquire(self, blocking: bool = True) -> bool:
        """Take a slot, waiting behind earlier callers; False only if ``blocking`` is False and none is free."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            if not blocking:
                return False
            handoff = threading.Lock()
            handoff.acquire()
            self._waiters.append(handoff)
        # release() unlocks it once the slot is ours; the slot never passes through ``_free``.
        handoff.acquire()
        return True

    def release(self) -> None:
        """Give the slot back: to the oldest waiter if there is one."""
        with self._lock:
            if self._waiters:
                self._waiters.popleft().release()
            elif self._free < self._slots:
                self._free += 1
            else:
                raise ValueError("released more often than acquired")

    def __enter__(self) -> FairGate:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

"""Exceptions no code path chose, caught at the boundary of a thread or callback, and loops that stall.

Every thread the agent runs (paho's network threads, workers, the outbox writer, the uplink drain, the
fallback expiry, the watchers, the audit sink) catches what it did not expect at its own boundary, records
it here and goes on: one bad message or one bug must cost one answer, never the thread. :data:`INTERNAL_ERRORS`
counts them by a fixed set of places (``edge_agent_internal_errors_total{where}`` in /metrics: never a client
name, so the series stay bounded) and logs each with its traceback, at most once per place every
``log_interval_s`` (a bug hit by every message must not flood the journal).

A thread that does not die can still hang (a read that never returns, a lock never released).
:data:`HEARTBEATS` marks each loop's rounds busy while they run; the agent feeds systemd's watchdog only
while no round has been busy for longer than the stall limit, so systemd restarts a hung agent. Both are
process-wide, like the process's memory and file descriptors: there is one set of threads per process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, TypeVar, get_args

log = logging.getLogger(__name__)

Where = Literal[
    "local_connect", "local_disconnect", "local_subscribe", "local_publish", "local_message", "intake", "worker",
    "reply", "uplink_connect", "uplink_disconnect", "uplink_publish", "uplink_message", "uplink_connection",
    "uplink_drain", "outbox_writer", "fallback_expiry", "model_watcher", "memory_watchdog", "audit_sink",
    "stream_sweeper", "deployer", "signing_rotation",
]  # fmt: skip
WHERE: tuple[Where, ...] = get_args(Where)
R = TypeVar("R")
# Without systemd's WATCHDOG_USEC: the unit's WatchdogSec=30s.
DEFAULT_STALL_S = 30.0


class InternalErrors:
    """Counts unexpected exceptions by place and logs them with their traceback, rate-limited per place."""

    def __init__(self, log_interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.log_interval_s = log_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._last_logged: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def record(self, where: Where, exc: BaseException) -> None:
        """Count ``exc`` at ``where``; log it with its traceback unless ``where`` logged one recently."""
        now = self._clock()
        with self._lock:
            self._counts[where] += 1
            last = self._last_logged.get(where)
            if last is not None and now - last < self.log_interval_s:
                self._unlogged[where] += 1
                return
            self._last_logged[where] = now
            unlogged, self._unlogged[where] = self._unlogged[where], 0
        more = f" ({unlogged} more since the last one logged)" if unlogged else ""
        log.error("internal error in %s, carrying on%s", where, more, exc_info=(type(exc), exc, exc.__traceback__))

    def counts(self) -> dict[Where, int]:
        """Errors so far, every place included (zero where none happened)."""
        with self._lock:
            return {where: self._counts[where] for where in WHERE}

    def guard(self, where: Where) -> _Guard:
        """Record and swallow an ``Exception`` raised in the block (``BaseException`` still propagates)."""
        return _Guard(self, where)

    def wrap(self, where: Where, function: Callable[..., R]) -> Callable[..., R | None]:
        """``function`` guarded: for callbacks a library calls on its own thread (paho's)."""

        def guarded(*args: Any, **kwargs: Any) -> R | None:
            try:
                return function(*args, **kwargs)
            except Exception as exc:
                self.record(where, exc)
                return None

        return guarded


class _Guard:
    """The context manager of :meth:`InternalErrors.guard`: a class, because a generator-based one costs
    several microseconds per block and guards wrap every request."""

    __slots__ = ("_errors", "_where")

    def __init__(self, errors: InternalErrors, where: Where) -> None:
        self._errors = errors
        self._where = where

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        self._errors.record(self._where, exc)
        return True


class Heartbeats:
    """When each loop's current round started; a round busy longer than ``stall_s`` is a stall."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Written without a lock: each key belongs to one thread, and a single dict store or pop is atomic.
        self._busy_since: dict[tuple[str, int], float] = {}

    def busy(self, loop: str) -> _Round:
        """Mark one round of ``loop`` (on this thread) as running until the block ends."""
        return _Round(self, (loop, threading.get_ident()))

    def stalled(self, stall_s: float) -> list[str]:
        """The loops whose current round has run for more than ``stall_s`` seconds."""
        now = self._clock()
        busy = self._busy_since.copy()  # one atomic copy: other threads keep starting and ending rounds
        return sorted({loop for (loop, _), since in busy.items() if now - since > stall_s})


class _Round:
    """The context manager of :meth:`Heartbeats.busy` (a class for the same reason as :class:`_Guard`)."""

    __slots__ = ("_heartbeats", "_key")

    def __init__(self, heartbeats: Heartbeats, key: tuple[str, int]) -> None:
        self._heartbeats = heartbeats
        self._key = key

    def __enter__(self) -> None:
        heartbeats = self._heartbeats
        heartbeats._busy_since[self._key] = heartbeats._clock()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._heartbeats._busy_since.pop(self._key, None)


def stall_limit_s() -> float:
    """How long one round of a loop may run before it counts as stuck: systemd's watchdog period, if any.

    A round longer than the period systemd allows between pings (``WATCHDOG_USEC``) is a hang, not work.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    return int(usec) / 1_000_000 if usec.isdigit() and int(usec) > 0 else DEFAULT_STALL_S


INTERNAL_ERRORS = InternalErrors()
HEARTBEATS = Heartbeats()

"""A daemon thread that runs one action every few seconds until stopped, surviving the action's bugs."""

from __future__ import annotations

import threading
from collections.abc import Callable

from agent.faults import HEARTBEATS, INTERNAL_ERRORS, Where


class PeriodicTask:
    """Runs ``action`` every ``interval_s`` on a named daemon thread; an exception is recorded, never fatal.

    For the agent's watchers (memory, model files): a bug in one round must not end the watching for the
    life of the process, and a round that hangs shows as a stall of ``name`` (see :mod:`agent.faults`).
    """

    def __init__(self, name: str, where: Where, interval_s: float, action: Callable[[], object]) -> None:
        self.name = name
        self.where: Where = where
        self.interval_s = interval_s
        self._action = action
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with HEARTBEATS.busy(self.name), INTERNAL_ERRORS.guard(self.where):
                self._action()

"""What callers hand the outbox's writer thread, and which of the waiting writes go into its next transaction.

A :class:`Command` is settled either through a :class:`~concurrent.futures.Future` (callers that wait for the
result) or through a plain callback (the request path, which stores a reply's upstream copy and publishes the
reply from the callback: no future, no condition variable, no waiting thread per reply).

The writer takes every write waiting at a time into one transaction, but at most ``max_rows`` new rows,
oldest first; the rest wait for the next one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

READ_OPS = frozenset({"stats", "peek"})
APPEND = "enqueue"
Settle = Callable[[Any, "BaseException | None"], None]


@dataclass(eq=False, slots=True)
class Command:
    """One ledger operation for the writer thread; ``rows`` counts what it stores (appends only)."""

    op: str
    args: tuple[Any, ...]
    future: Future[Any] | None = None
    then: Settle | None = None
    source: str = ""
    rows: int = 0
    done: bool = False

    @property
    def read(self) -> bool:
        return self.op in READ_OPS

    def resolve(self, result: Any) -> None:
        """Settle with ``result`` (once; later calls are ignored)."""
        if self.done:
            return
        self.done = True
        if self.future is not None:
            self.future.set_result(result)
        elif self.then is not None:
            self.then(result, None)

    def fail(self, error: BaseException) -> None:
        """Settle with ``error`` (once; later calls are ignored)."""
        if self.done:
            return
        self.done = True
        if self.future is not None:
            self.future.set_exception(error)
        elif self.then is not None:
            self.then(None, error)


def fair_transaction(waiting: Iterable[Command], max_rows: int) -> tuple[list[Command], list[Command]]:
    """Split ``waiting`` (in arrival order) into the next transaction's commands and those left for later.

    Every command that stores nothing goes now, in arrival order, first. Appends follow in arrival order
    until ``max_rows`` rows are taken (at least one append, so a single large one still goes).
    """
    now: list[Command] = []
    appends: list[Command] = []
    by_source: dict[str, deque[Command]] = {}
    for command in waiting:
        if command.op == APPEND:
            appends.append(command)
            by_source.setdefault("", deque()).append(command)
        else:
            now.append(command)
    taken: set[int] = set()
    rows = 0
    while by_source and (rows < max_rows or not taken):
        for source in list(by_source):
            queue = by_source[source]
            command = queue.popleft()
            if not queue:
                del by_source[source]
            now.append(command)
            taken.add(id(command))
            rows += command.rows
            if rows >= max_rows:
                break
    return now, [command for command in appends if id(command) not in taken]

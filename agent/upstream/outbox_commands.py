"""What callers hand the outbox's writer thread, and which of the waiting writes go into its next transaction.

A :class:`Command` is settled either through a :class:`~concurrent.futures.Future` (callers that wait for the
result) or through a plain callback (the request path, which stores a reply's upstream copy and publishes the
reply from the callback: no future, no condition variable, no waiting thread per reply).

Fair commits. Every reply waits for the commit of its upstream copy, so a transaction is also a queue: a
client flooding the agent must not put its rows between a light client's row and that row's fsync. The
writer therefore takes the rows for a transaction round-robin by their ``source`` (the client a reply
answers), at most ``max_rows`` of them: a source with one row waiting gets it into the very next
transaction, ahead of a flood's backlog, and its callback (its reply) runs among the first after the
commit. Rows of one source keep their order, and a row id is given when its transaction runs, so a
class's records still leave in the order they were stored.
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

    Every command that stores nothing goes now, in arrival order, first. Appends follow round-robin by
    ``source``, each source's in arrival order, while they fit in ``max_rows`` rows (at least one append
    goes, however large). The rest stay, in arrival order.
    """
    now: list[Command] = []
    appends: list[Command] = []
    by_source: dict[str, deque[Command]] = {}
    for command in waiting:
        if command.op == APPEND:
            appends.append(command)
            by_source.setdefault(command.source, deque()).append(command)
        else:
            now.append(command)
    taken: set[int] = set()
    rows = 0
    progressed = True
    while by_source and progressed:
        progressed = False
        for source in list(by_source):
            queue = by_source[source]
            if taken and rows + queue[0].rows > max_rows:
                continue  # this source's next command does not fit; a smaller one of another may
            command = queue.popleft()
            if not queue:
                del by_source[source]
            now.append(command)
            taken.add(id(command))
            rows += command.rows
            progressed = True
    return now, [command for command in appends if id(command) not in taken]

"""What the ledger keeps in memory so that the steady state under load neither reads rows back nor marks them.

:class:`FreshRows`: the rows a claim can take without reading them back, every queued row of a class as it was
stored. :class:`HeldClaims`: the rows claimed from there, which the file keeps *queued*.

Under load a reply's upstream copy is claimed milliseconds after it was committed; reading its body back
from the file cost 5-8 us a row on the outbox's writer thread. The ledger (:mod:`agent.upstream.outbox_ledger`)
keeps, per class, the queued rows it appended, for as long as it knows them to be *all* the queued rows of
that class in id order: from the claim that took the last queued row of the class (its queue is empty
then) until anything other than an append or a claim changes its queued rows (a requeue, an eviction, an
expiry, a failed transaction), or until they pass the caps below. A backlog (the cloud down) is therefore
always read back from the file, never held in memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

# id, msg_id, cls, body, enqueued_wall, enqueued_clock, expires_clock, attempts: as the claim's SELECT reads a row.
Claimable = tuple[int, str, str, bytes, float, float, float | None, int]
_MAX_ROWS = 4096
_MAX_BYTES = 4 << 20


class FreshRows:
    """Per class, while known: its queued rows, oldest first (writer thread only)."""

    def __init__(self) -> None:
        self._rows: dict[str, deque[Claimable]] = {}
        self._bytes = 0

    def take(self, cls: str, limit: int, queued: int) -> list[Claimable] | None:
        """The oldest ``limit`` queued rows of ``cls``, or None when they are not known (read the file).

        ``queued`` is the ledger's count of queued rows of the class: rows known but fewer or more than that
        count are not trusted (and forgotten).
        """
        rows = self._rows.get(cls)
        if rows is None:
            return None
        if len(rows) != queued:
            self.forget(cls)
            return None
        taken = [rows.popleft() for _ in range(min(limit, len(rows)))]
        self._bytes -= sum(len(row[3]) for row in taken)
        return taken

    def empty(self, classes: Iterable[str]) -> None:
        """These classes have no queued row left: what they append from now on is known."""
        for cls in classes:
            rows = self._rows.get(cls)
            if rows is None or rows:
                self.forget(cls)
                self._rows[cls] = deque()

    def remember(self, values: Sequence[tuple[Any, ...]], first_id: int) -> None:
        """Rows just inserted, ``(msg_id, cls, body, size, enqueued_wall, enqueued_clock, expires_clock)`` with
        consecutive ids from ``first_id``; kept for the classes known, within the caps."""
        for offset, (msg_id, cls, body, size, wall, clock, expires) in enumerate(values):
            rows = self._rows.get(cls)
            if rows is None:
                continue
            if len(rows) >= _MAX_ROWS or self._bytes + size > _MAX_BYTES:
                self.forget(cls)
                continue
            rows.append((first_id + offset, msg_id, cls, body, wall, clock, expires, 0))
            self._bytes += size

    def forget(self, classes: str | Iterable[str] | None = None) -> None:
        """Stop knowing the queued rows of ``classes`` (a class, several, or None: every class)."""
        if classes is None:
            self._rows.clear()
            self._bytes = 0
            return
        for cls in (classes,) if isinstance(classes, str) else set(classes):
            rows = self._rows.pop(cls, None)
            if rows:
                self._bytes -= sum(len(row[3]) for row in rows)


class HeldClaims:
    """Rows claimed from :class:`FreshRows` without marking them in the file: ``rows`` maps id -> (cls, size).

    Marking a claim rewrites the row's pages (a reply copy's body shares them) into the WAL once more, only
    for the mark to be deleted with the row on its PUBACK or undone at the next open. Not marking them took
    the writer from 37-40 to 32-34 us of CPU per row and its writes from 13 to 8-9 KB per row (outbox and
    uplink in one process, 32 rows in flight, 1.6 KB bodies). The file keeps such a row ``queued``; the ledger treats it as claimed
    (every read of states goes through :meth:`mark`). A failed transaction restores what it changed
    (:meth:`rollback`). Writer thread only.
    """

    def __init__(self) -> None:
        self.rows: dict[int, tuple[str, int]] = {}
        self._before: dict[int, tuple[str, int]] | None = None

    def begin(self) -> None:
        """A transaction starts: what it changes can be rolled back."""
        self._before = None

    def rollback(self) -> None:
        """Undo the changes of the transaction that failed."""
        if self._before is not None:
            self.rows, self._before = self._before, None

    def add(self, row_id: int, cls: str, size: int) -> None:
        self._keep_before()
        self.rows[row_id] = (cls, size)

    def discard(self, ids: Iterable[int]) -> None:
        for row_id in ids:
            if row_id in self.rows:
                self._keep_before()
                del self.rows[row_id]

    def of_class(self, cls: str) -> int:
        return sum(1 for held_cls, _ in self.rows.values() if held_cls == cls)

    def mark(self, rows: list[tuple[int, str, int, str]], claimed: str) -> list[tuple[int, str, int, str]]:
        """``rows`` (id, cls, size, state) with the state of held rows set to ``claimed``."""
        if not self.rows:
            return rows
        return [(i, cls, size, claimed if i in self.rows else state) for i, cls, size, state in rows]

    def _keep_before(self) -> None:
        if self._before is None:
            self._before = dict(self.rows)

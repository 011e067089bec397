"""The durable outbox: every message the device owes the cloud, on disk before anyone relies on it.

What callers can rely on:

* **Durable on return.** ``enqueue`` returns only once its row is committed with ``synchronous=FULL`` in
  WAL mode (fsynced). One writer thread folds every write waiting at that moment into one transaction and
  one fsync (group commit), so many request threads share the cost. At most ``batch_max`` new rows go into
  one transaction, taken round-robin by their source (``enqueue_then``): a client's row is never held behind
  another client's backlog (:mod:`agent.upstream.outbox_commands`).
* **Never deleted on dequeue.** ``claim_batch`` marks rows *claimed*; only ``mark_delivered`` (a PUBACK
  below 0x80) deletes them. Claims do not survive the process: at open, and on ``release_claims``, claimed
  rows are *queued* again and resent (at-least-once; the stable ``msg_id`` lets the cloud drop repeats).
  Since a claim is undone at open anyway, a row claimed right after its commit (its class's queue had been
  emptied, the steady state under load) is claimed in memory only: the file keeps it *queued* (``peek`` from
  another process shows it so) while ``stats``/``peek`` of this one say *claimed*; its ``attempts`` count is
  written if it comes back (released, refused), not if the process ends. A batch holding only claims,
  releases and deletions of delivered rows commits without its own fsync (``synchronous=NORMAL``, under which WAL checkpoints are still synced):
  a deletion lost to a power cut only sends that row once more, with its ``msg_id``; the drain pays no fsync.
* **Order.** Row ids come from ``AUTOINCREMENT`` (never reused, never from a clock). Within a class,
  ``claim_batch`` hands rows out oldest id first, including rows released back after a disconnect or crash.
  Across classes it serves ``fallback``, ``deploy``, ``res``, ``audit``, then ``telemetry``, so a telemetry backlog
  never delays a deadline-bound fallback request.
* **Dead letters.** ``mark_failed`` (a PUBACK of 0x80 or more) parks a row as *dead*. It is queued again
  after ``dead_letter_retry_s``, doubling per refusal up to ``dead_letter_retry_max_s``; after
  ``dead_letter_max_attempts`` refusals it stays dead (counted, visible in ``peek``) until ``retry_dead``
  or until capacity or TTL removes it. A retried row is sent after rows that overtook it: it keeps its
  ``msg_id`` and id (``seq`` upstream) so the cloud can put it back in place.
* **Bounds.** When ``max_messages`` or ``max_bytes`` (sum of bodies) would be exceeded, expired rows go
  first, then the oldest unclaimed rows of ``telemetry``, ``fallback``, ``res``, ``deploy`` and finally ``audit``. A new
  message can be the one that goes (e.g. telemetry into a store full of audit records): its ``enqueue``
  raises :class:`OutboxError`. A body larger than ``max_bytes`` is refused. Rows in flight (claimed, at
  most the uplink's window) are never evicted and do not count against the bounds. Every drop is counted
  by reason (``capacity``, ``expired``, ``too_large``) and class.
* **TTL** per class (``ttl_s``) or per message, measured on the boot clock (see :mod:`agent.upstream.outbox_file`):
  a wall-clock jump never expires anything early.
* **Faults.** A corrupt file (SQLite's checks, a zero-length file, a damaged or cut-short -wal: see
  :mod:`agent.upstream.outbox_wal`) is salvaged as far as it can be read, moved aside with its -wal/-shm under
  a timestamped name (kept), and replaced by a fresh file holding the salvaged rows; logged at ERROR and
  counted in ``stats``. Disk full (or ``max_file_bytes``) fails the writes of that transaction with a clear
  :class:`OutboxError`; stored rows are untouched. On a full disk the outbox gives back its reserve so that
  deliveries go on, refuses new messages until space returns, and if it could not even open, opens by itself
  later (:mod:`agent.upstream.outbox_space`); ``stats().problem`` says what is wrong meanwhile.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path

from pydantic import BaseModel, Field, PositiveFloat, ValidationInfo, field_validator

from agent.config import MessageClass, OutboxSettings
from agent.errors import OutboxError
from agent.upstream.message_ids import new_msg_id
from agent.upstream.outbox_file import OutboxClock
from agent.upstream.outbox_ledger import EVICTION_ORDER, SEND_ORDER
from agent.upstream.outbox_models import (
    ClassStats,
    CorruptionEvent,
    OutboxEntry,
    OutboxRecord,
    OutboxStats,
)
from agent.upstream.outbox_writer import OutboxWriter

__all__ = [
    "EVICTION_ORDER",
    "SEND_ORDER",
    "ClassStats",
    "CorruptionEvent",
    "Outbox",
    "OutboxEntry",
    "OutboxItem",
    "OutboxRecord",
    "OutboxStats",
]

# Validation context for bodies the agent just produced with a JSON encoder: parsing a signed 82 KB reply
# again only to learn that it is JSON costs more than storing it.
ENCODED_BY_AGENT = "encoded_by_agent"




class OutboxItem(BaseModel):
    """One message to store: ``body`` is a UTF-8 JSON document, embedded as-is in the upstream envelope."""

    cls: MessageClass
    body: bytes
    ttl_s: PositiveFloat | None = None
    msg_id: str | None = Field(None, min_length=1, max_length=64)

    @field_validator("body")
    @classmethod
    def _body_is_json(cls, value: bytes, info: ValidationInfo) -> bytes:
        if not (info.context or {}).get(ENCODED_BY_AGENT):
            json.loads(value)
        return value


class Outbox:
    """The store at ``path`` (a file in ``data_dir``); one writer process at a time (a lock file enforces it).

    ``read_only=True`` opens a running agent's outbox for ``stats``/``peek`` without touching it.
    """

    def __init__(
        self,
        path: Path,
        settings: OutboxSettings | None = None,
        *,
        read_only: bool = False,
        clock: OutboxClock | None = None,
    ) -> None:
        self.path = Path(path)
        self.settings = settings or OutboxSettings()
        self.read_only = read_only
        self._writer = OutboxWriter(self.path, self.settings, read_only=read_only, clock=clock or OutboxClock())

    # -- public API ---------------------------------------------------------------------------------

    def enqueue(self, cls: MessageClass, body: bytes, *, ttl_s: float | None = None, msg_id: str | None = None) -> str:
        """Store one message durably and return its msg_id (UUIDv7 unless given)."""
        return self.enqueue_many([OutboxItem(cls=cls, body=body, ttl_s=ttl_s, msg_id=msg_id)])[0]

    def enqueue_many(self, items: Sequence[OutboxItem]) -> list[str]:
        """Store messages durably in one transaction; returns their msg_ids in order.

        Raises :class:`OutboxError` if any could not be stored; the others stay stored.
        """
        return self.enqueue_async(items).result()

    def enqueue_async(self, items: Sequence[OutboxItem]) -> Future[list[str]]:
        """Like :meth:`enqueue_many` without waiting: the future resolves once the messages are durable.

        Lets a caller hand its row to the group commit and go on working; the future's callbacks run on the
        writer thread right after the commit (keep them short), or at once if it already completed. (The
        request path uses :meth:`enqueue_then`, which spares the future.)
        """
        rows = []
        for item in items:
            ttl = item.ttl_s if item.ttl_s is not None else self.settings.ttl_s.get(item.cls)
            rows.append((item.cls, item.body, ttl, item.msg_id or new_msg_id()))
        stored: Future[list[str]] = Future()

        def settle(row_ids: list[int | None] | None, error: BaseException | None) -> None:
            if error is None:
                error = self._refusal(rows, row_ids or [])
            if error is not None:
                stored.set_exception(error)
            else:
                stored.set_result([row[3] for row in rows])

        try:
            self._writer.append(rows, source="", then=settle)
        except OutboxError as exc:
            stored.set_exception(exc)
        return stored

    def enqueue_then(
        self, cls: MessageClass, body: bytes, *, source: str, then: Callable[[OutboxError | None], None]
    ) -> None:
        """Store one message (a UTF-8 JSON document the agent encoded itself) and call ``then(None)`` once it
        is durable, or ``then(error)`` if it could not be stored; ``then`` runs on the writer thread right
        after the commit (keep it short), or at once if the outbox is closed.

        The request path's way in: no future to wait on. ``source`` names whose message it is (the client
        a reply answers): commits are shared fairly between sources, so a flood's rows never stand between
        another client's row and its commit.
        """
        rows = [(cls, body, self.settings.ttl_s.get(cls), new_msg_id())]

        def settle(row_ids: list[int | None] | None, error: BaseException | None) -> None:
            if error is None:
                then(self._refusal(rows, row_ids or []))
            else:
                then(error if isinstance(error, OutboxError) else OutboxError(f"outbox {self.path}: {error}"))

        try:
            self._writer.append(rows, source=source, then=settle)
        except OutboxError as exc:
            then(exc)

    def _refusal(self, rows: list[tuple[str, bytes, float | None, str]], row_ids: list[int | None]) -> OutboxError | None:
        """The error for rows committed without an id (no room under the bounds), or None if all are stored."""
        refused = [row[3] for row, row_id in zip(rows, row_ids) if row_id is None]
        if not refused:
            return None
        return OutboxError(
            f"outbox {self.path}: {len(refused)} of {len(rows)} message(s) not stored, no room under "
            f"max_bytes={self.settings.max_bytes}/max_messages={self.settings.max_messages} "
            f"for their class: {', '.join(refused[:5])}"
        )

    def claim_batch(self, limit: int) -> list[OutboxRecord]:
        """Mark up to ``limit`` queued rows claimed and return them, oldest first per class (see above)."""
        return self._writer.submit("claim", int(limit)) if limit > 0 else []

    def mark_delivered(self, ids: Iterable[int]) -> int:
        """Delete rows the cloud acknowledged; returns how many existed."""
        return self.mark_delivered_async(ids).result()

    def mark_delivered_async(self, ids: Iterable[int]) -> Future[int]:
        """Like :meth:`mark_delivered` without waiting: a claim submitted right after joins its transaction."""
        return self._writer.submit_nowait("delivered", sorted(set(ids)))

    def mark_failed(self, row_id: int, reason_code: int) -> None:
        """Dead-letter a claimed row the cloud refused with ``reason_code`` (>= 0x80)."""
        self.mark_failed_many([(row_id, reason_code)])

    def mark_failed_many(self, failures: Sequence[tuple[int, int]]) -> None:
        """Dead-letter claimed rows the cloud refused, as ``(row id, reason code)`` pairs, in one transaction."""
        self._writer.submit("failed", list(failures))

    def release_claims(self, ids: Iterable[int] | None = None) -> int:
        """Return claimed rows (all, or those in ``ids``) to the queue; returns how many."""
        return self._writer.submit("release", None if ids is None else sorted(set(ids)))

    def retry_dead(self, ids: Iterable[int] | None = None) -> int:
        """Queue dead rows (all, or those in ``ids``) again with a fresh refusal count; returns how many."""
        return self._writer.submit("retry_dead", None if ids is None else sorted(set(ids)))

    def stats(self) -> OutboxStats:
        """Totals per class and state, drops, dead letters, faults and write transactions."""
        return self._writer.submit("stats")

    def peek(self, n: int = 20, *, cls: MessageClass | None = None, state: str | None = None) -> list[OutboxEntry]:
        """The ``n`` oldest rows, optionally of one class and/or state (queued, claimed, dead)."""
        return self._writer.submit("peek", n, cls, state)

    def add_queued_listener(self, callback: Callable[[frozenset[str]], None]) -> None:
        """Call ``callback(classes)`` (on the writer thread; it must not block) whenever rows of ``classes``
        become queued."""
        self._writer.add_queued_listener(callback)

    def run_callbacks_within(self, scope: Callable[[], AbstractContextManager[None]]) -> None:
        """Run the callbacks of each commit (``enqueue_then``'s ``then``) inside one ``scope()`` block, e.g.
        the local link's :meth:`~agent.mqtt.local_link.LocalLink.publishing_together`: the replies they
        publish then leave together."""
        self._writer.callback_scope = scope

    def add_corruption_listener(self, callback: Callable[[CorruptionEvent], None]) -> None:
        """Call ``callback(event)`` for every corrupt file this outbox moved aside and salvaged, those found while
        opening included (replayed at once); on the writer thread, so it must not block."""
        self._writer.corruptions.add(callback)

    def close(self) -> None:
        """Finish every write already submitted, then close the file. Later calls raise OutboxError."""
        self._writer.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

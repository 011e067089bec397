"""The uplink's drain thread, and the publish window it shares with the connection thread.

The drain does the outbox's disk work (claims, acknowledgements, releases) so that a slow fsync never stalls
the network; :mod:`agent.upstream.uplink` owns the connection thread and documents the delivery guarantees.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Protocol

from agent.config import CloudBroker
from agent.errors import OutboxError
from agent.faults import HEARTBEATS, INTERNAL_ERRORS
from agent.upstream.uplink_batch import UNBATCHED_CLASSES, Batcher, Publication
from agent.upstream.uplink_wire import ClaimedRecord

# Kept from before the split, so logging configuration and log searches keep matching.
log = logging.getLogger("agent.upstream.uplink")

_IDLE_WAKE_S = 1.0
_REASON_PACKET_TOO_LARGE = 0x95
_MAX_CLAIM_ROWS = 1 << 20


class OutboxPort(Protocol):
    """The part of ``agent.upstream.outbox.Outbox`` the uplink drives (adapters do not import each other)."""

    def claim_batch(self, limit: int) -> Sequence[ClaimedRecord]: ...
    def mark_delivered(self, ids: Iterable[int]) -> int: ...
    def mark_delivered_async(self, ids: Iterable[int]) -> Future[int]: ...
    def mark_failed_many(self, failures: Sequence[tuple[int, int]]) -> None: ...
    def release_claims(self, ids: Iterable[int] | None = None) -> int: ...
    def add_queued_listener(self, callback: Callable[[frozenset[str]], None]) -> None: ...


class PublishWindow:
    """The publications between the drain and the connection thread, and the connection they belong to.

    ``lock`` guards ``generation``, ``connected_generation``, ``to_publish`` and ``lost`` between the two
    threads; the connection thread never calls paho while holding it. ``inflight`` (paho mid -> publication)
    is written by the connection thread only. ``size`` and ``max_packet`` are set by the connection thread
    from the broker's CONNACK.
    """

    def __init__(self, size: int) -> None:
        self.lock = threading.Lock()
        self.generation = 0
        self.connected_generation = -1
        self.to_publish: collections.deque[Publication] = collections.deque()
        self.inflight: dict[int, Publication] = {}
        # (row ids of one publication, its PUBACK reason): a batch's rows are settled together, not one by one.
        self.acks: collections.deque[tuple[Sequence[int], int]] = collections.deque()
        self.lost: collections.deque[int] = collections.deque()  # row ids to release
        self.size = size
        self.max_packet: int | None = None

    def free_slots(self) -> int:
        """How many more publications the broker may have awaiting PUBACK now."""
        return self.size - len(self.inflight) - len(self.to_publish)


class Drain:
    """Claims rows into the window, settles PUBACKs and releases lost rows, on the ``uplink-drain`` thread."""

    def __init__(
        self,
        outbox: OutboxPort,
        cloud: CloudBroker,
        device_id: str,
        window: PublishWindow,
        *,
        is_connected: Callable[[], bool],
        wake_connection: Callable[[], None],
    ) -> None:
        self._outbox = outbox
        self._window = window
        self._is_connected = is_connected
        self._wake_connection = wake_connection
        self._batcher = Batcher(cloud, device_id)
        self._batcher_gen = 0  # the connection generation the held rows were claimed in
        self._unsettled_ok: list[int] = []
        self._unsettled_refused: list[tuple[int, int]] = []
        self._unreleased: list[int] = []
        self._cond = threading.Condition()
        self._woken = False
        # Ends a linger early: rows of a class never held (fallback) were queued, or the uplink stops. Not the
        # condition above, which every commit notifies: waking a lingering drain per commit is what lingering saves.
        self._urgent = threading.Event()
        self._settled = False  # nothing held, handed over or awaiting a PUBACK
        self._has_work = True
        self._linger_s = cloud.drain_linger_ms / 1000
        self._backlog = False  # the last claim filled all the room it had: rows are waiting
        # Rows one claim may mark: halved after a claim failed (a full disk has room for a small transaction,
        # not for marking a whole window of batches), doubled back after each claim that worked.
        self._claim_cap = _MAX_CLAIM_ROWS
        self._accepting = True
        self._done = False
        self.counts = collections.Counter[str]()  # delivered, refused
        outbox.add_queued_listener(self._on_rows_queued)

    @property
    def buffered(self) -> int:
        """Records claimed and held for a batch, not yet handed over."""
        return self._batcher.buffered

    def reset(self) -> None:
        """Accept rows again (before the thread starts)."""
        self._accepting, self._done = True, False
        self._urgent.clear()

    def settle(self, timeout: float) -> None:
        """Stop claiming, flush held batches, and wait up to ``timeout`` s for the window to empty."""
        with self._cond:
            self._accepting, self._settled, self._woken = False, False, True
            self._urgent.set()
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._settled, timeout=timeout)

    def finish(self) -> None:
        """Let the thread release every unacknowledged row and end; call once the connection thread ended."""
        self._done = True
        self._urgent.set()
        self.wake()

    def wake(self) -> None:
        """Make the drain look at the window, the acknowledgements and the outbox again."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def _on_rows_queued(self, classes: frozenset[str]) -> None:
        self._has_work = True
        if not classes.isdisjoint(UNBATCHED_CLASSES):
            self._urgent.set()
        self.wake()

    def run(self) -> None:
        """The ``uplink-drain`` thread's body: runs until :meth:`finish`."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._woken, timeout=self._drain_wait())
                self._woken = False
            if self._linger_s and self._accepting and not self._backlog:
                # Under request load every PUBACK and every commit wakes the drain; acting on each one costs
                # two outbox transactions and four thread hand-offs per record. A backlog is not held back:
                # there the window, not the wake-ups, sets the pace; nor is a cloud-fallback request, which
                # waits for its answer; nor is stopping.
                self._urgent.wait(self._linger_s)
            if self._accepting and not self._done:
                self._urgent.clear()
            # Read first: _done is set only after the connection thread has moved every
            # unacknowledged row to the window's lost rows, so a finishing pass releases them all.
            finishing = self._done
            try:
                with HEARTBEATS.busy("uplink-drain"):
                    self._release_lost(finishing)
                    if finishing:
                        self._record_acks()
                    else:
                        # Deletions and the claim are handed to the outbox together, so they share one
                        # transaction (neither needs an fsync) and one round trip to its writer thread.
                        # Acknowledgements arriving meanwhile wait for the next round (they woke it).
                        deleting = self._submit_deliveries()
                        try:
                            self._claim_more()
                            self._hand_over_ready()
                        finally:
                            self._confirm_deliveries(deleting)
                        self._record_refusals()
            except OutboxError as exc:
                self._has_work = True
                log.error("uplink cannot update the outbox, will retry: %s", exc)
            except Exception as exc:  # a bug costs this round, never the drain; the rows stay for the next
                self._has_work = True
                INTERNAL_ERRORS.record("uplink_drain", exc)
            with self._cond:
                self._settled = not (self._window.inflight or self._window.to_publish or self._batcher.buffered)
                self._cond.notify_all()  # stop() may be waiting for the window to empty
            if finishing:
                return

    def _drain_wait(self) -> float:
        """Seconds until the drain must look again without being woken: when a held batch falls due.

        With the window full (or no connection) a due batch cannot leave; a PUBACK or CONNACK wakes the
        drain then, so waiting for the due time would only spin.
        """
        due = self._batcher.next_due()
        if due is None or self._window.free_slots() <= 0 or not self._is_connected():
            return _IDLE_WAKE_S
        return min(_IDLE_WAKE_S, max(0.0, due - time.monotonic()))

    def _release_lost(self, finishing: bool) -> None:
        """Give back rows whose connection ended unacknowledged, before anything newer is claimed.

        Rows held for a batch go back too: they are newer than the lost ones of their class, and sending
        them first would break the class's order.
        """
        window = self._window
        with window.lock:
            stale = self._batcher_gen != window.generation
        if stale or finishing:
            self._unreleased.extend(self._batcher.take_all())
        while window.lost:
            self._unreleased.append(window.lost.popleft())
        if self._unreleased:
            self._outbox.release_claims(self._unreleased)
            self._unreleased = []
            self._has_work = True

    def _take_acks(self) -> None:
        acks = self._window.acks
        while acks:
            row_ids, reason = acks.popleft()
            if reason < 0x80:
                self._unsettled_ok.extend(row_ids)
            else:
                self._unsettled_refused.extend((row_id, reason) for row_id in row_ids)

    def _submit_deliveries(self) -> tuple[list[int], Future[int]] | None:
        """Hand the acknowledged rows' deletion to the outbox without waiting; see :meth:`_confirm_deliveries`."""
        self._take_acks()
        if not self._unsettled_ok:
            return None
        ids, self._unsettled_ok = self._unsettled_ok, []
        return ids, self._outbox.mark_delivered_async(ids)

    def _confirm_deliveries(self, deleting: tuple[list[int], Future[int]] | None) -> None:
        """Wait for a deletion :meth:`_submit_deliveries` handed over; if it failed, keep its rows for the next try."""
        if deleting is None:
            return
        ids, future = deleting
        try:
            future.result()
        except BaseException:
            self._unsettled_ok = ids + self._unsettled_ok
            raise
        self.counts["delivered"] += len(ids)

    def _record_acks(self) -> None:
        self._confirm_deliveries(self._submit_deliveries())
        self._record_refusals()

    def _record_refusals(self) -> None:
        self._take_acks()  # refusals only: rows acknowledged by now are deleted in the next round
        if self._unsettled_refused:
            self._outbox.mark_failed_many(self._unsettled_refused)
            self.counts["refused"] += len(self._unsettled_refused)
            self._unsettled_refused = []

    def _claim_more(self) -> None:
        window = self._window
        if not (self._accepting and self._has_work and self._is_connected()):
            return
        room = self._batcher.claim_limit(window.free_slots())
        with window.lock:
            # Rows of an ended connection not yet back in the queue are older than anything a claim
            # would return now: claiming past them would break per-class order.
            if room <= 0 or window.lost or self._unreleased or window.connected_generation != window.generation:
                return
            generation = window.generation
            if self._batcher.buffered and self._batcher_gen != generation:
                return
        self._has_work = False  # before claiming, so a listener call during the claim is not lost
        room = min(room, self._claim_cap)
        try:
            records = self._outbox.claim_batch(room)
        except OutboxError:
            self._claim_cap = max(1, room // 2)
            raise
        self._claim_cap = min(_MAX_CLAIM_ROWS, self._claim_cap * 2)
        self._backlog = len(records) == room
        if self._backlog:
            self._has_work = True
        self._batcher.add(records)
        self._batcher_gen = generation

    def _hand_over_ready(self) -> None:
        """Pass the publications that are due to the connection thread, as far as the window allows."""
        window = self._window
        slots = window.free_slots()
        if not self._batcher.buffered or slots <= 0 or not self._is_connected():
            return
        publications, too_large = self._batcher.take(slots, max_packet=window.max_packet, flush=not self._accepting)
        if too_large:
            window.acks.append((too_large, _REASON_PACKET_TOO_LARGE))
        if not publications:
            return
        with window.lock:
            handed_over = window.generation == self._batcher_gen and window.connected_generation == self._batcher_gen
            if handed_over:
                window.to_publish.extend(publications)
            else:
                for publication in publications:
                    window.lost.extend(publication.row_ids)
        if handed_over:
            self._wake_connection()
        else:
            self.wake()

"""The intake buffer: one FIFO per client, served by deficit round robin on measured cost, bounded in
requests and in bytes.

mosquitto keeps one queue per session for all publishers, so work left at the broker would wait behind a
flooder's; the agent therefore keeps reading and queues inside, where it can share the device fairly:

- **Order.** Deficit round robin (Shreedhar and Varghese, 1995) over the clients with waiting requests,
  each request weighted by its expected service time (``cost_s``, measured per method and model). Every
  client with work gets the same service time per round, whatever its requests cost, and a lone client
  gets all of it. Within a client, requests keep their arrival order.
- **Bounds.** When the buffer would exceed ``max_requests`` or ``max_bytes``, requests are shed from the
  client holding the largest share of the buffer (its share of the requests plus its share of the bytes),
  newest first, so the oldest, closest to service, keep their place. That may be the arriving request.
  The heaviest client is found through a lazily pruned heap, so shedding stays O(log n) even when a
  flood comes from thousands of client ids.
- **Expected wait.** Under round robin, a new request waits for its own client's queue, and for each other
  client's queue only up to as much service as its own client will get: ``expected_wait_s`` sums that
  (plus what is being served) over the parallelism, which admission compares with the request's deadline.

Thread-safe: the network thread offers, workers take.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

from agent.exchange import InboundRequest
from agent.models.streams import ArrivalOrder

# What a request's service time is measured under: (method, model) as read from its head.
CostKey = tuple[bytes | None, bytes | None]
# What a waiting request costs beyond its payload: the InboundRequest, its bytes object and queue slots.
ENTRY_OVERHEAD_BYTES = 512


@dataclass(slots=True)
class Queued:
    """One waiting request, its expected service time, and what its cost is measured under (``cost_key``)."""

    inbound: InboundRequest
    cost_s: float
    cost_key: CostKey = (None, None)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.inbound.payload) + ENTRY_OVERHEAD_BYTES


@dataclass(slots=True)
class _ClientQueue:
    items: deque[Queued] = field(default_factory=deque)
    deficit_s: float = 0.0
    cost_s: float = 0.0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class IntakeFigures:
    requests: int
    bytes: int
    clients: int
    serving_cost_s: float


class FairIntake:
    """Per-client queues served fairly; ``offer`` on arrival, ``take`` on a worker, ``finished`` after."""

    def __init__(
        self, *, max_requests: int, max_bytes: int, parallelism: int, quantum_s: float = 0.005,
        arrivals: ArrivalOrder | None = None,
    ) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.parallelism = max(1, parallelism)
        self.quantum_s = quantum_s
        self._queues: dict[str, _ClientQueue] = {}
        # Clients in round-robin order. A client whose queue emptied stays until it reaches the front
        # (removing it from the middle of a deque costs O(n) on the network thread); _in_rotation says
        # who has a place, so that a client coming back does not get two.
        self._active: deque[str] = deque()
        self._in_rotation: set[str] = set()
        # (-weight, tiebreak, client) for every change of a client's weight; stale entries are skipped. Kept
        # only while the buffer is more than half full (and rebuilt on the way up): a buffer far from its
        # bounds never sheds, so the common case pays nothing for it.
        self._heaviest: list[tuple[int, int, str]] = []
        self._tracking = False
        self._tiebreak = itertools.count()
        self._requests = 0
        self._bytes = 0
        self._cost_s = 0.0
        self._serving_cost_s = 0.0
        self._closed = False
        self._ready = threading.Condition()
        # Told of each request taken and finished, so stateful streams keep their arrival order.
        self._arrivals = arrivals

    # ---- the network thread ----------------------------------------------------------------------

    def offer(self, item: Queued) -> list[Queued]:
        """Queue ``item``; returns what was shed to stay within bounds (possibly ``item`` itself), oldest first."""
        with self._ready:
            client = item.inbound.client_id
            queue = self._queues.get(client)
            if queue is None:
                queue = self._queues[client] = _ClientQueue()
                if client not in self._in_rotation:
                    self._in_rotation.add(client)
                    self._active.append(client)
                    if len(self._active) > 2 * len(self._queues) + 64:
                        self._active = deque(name for name in self._active if name in self._queues)
                        self._in_rotation = set(self._active)
            self._push(queue, item)
            shed: list[Queued] = []
            while self._requests > self.max_requests or self._bytes > self.max_bytes:
                shed.append(self._shed_one())
            if item not in shed:
                self._ready.notify()
            return shed

    def expected_wait_s(self, client_id: str, cost_s: float, *, enough_s: float = 0.0) -> float:
        """How long a new request of ``cost_s`` from ``client_id`` would wait before a worker takes it.

        When even waiting for everything queued would take at most ``enough_s``, that bound is returned
        without the per-client sum, which is O(clients) on the network thread.
        """
        with self._ready:
            bound = (self._cost_s + self._serving_cost_s) / self.parallelism
            if bound <= enough_s:
                return bound
            own = self._queues[client_id].cost_s if client_id in self._queues else 0.0
            share = own + cost_s
            others = sum(min(queue.cost_s, share) for name, queue in self._queues.items() if name != client_id)
            return (own + others + self._serving_cost_s) / self.parallelism

    def figures(self) -> IntakeFigures:
        with self._ready:
            return IntakeFigures(self._requests, self._bytes, len(self._queues), self._serving_cost_s)

    def __len__(self) -> int:
        return self._requests

    # ---- workers ---------------------------------------------------------------------------------

    def take(self, timeout: float | None = None) -> Queued | None:
        """The next request in fair order; None once closed (or after ``timeout`` with nothing waiting)."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._closed or self._requests > 0, timeout) or self._closed:
                return None
            item = self._next_fair()
            self._serving_cost_s += item.cost_s
            if self._arrivals is not None:  # under the lock: reported in the order taken, which is arrival order
                self._arrivals.taken(item.inbound.client_id, item.inbound.received)
            return item

    def finished(self, item: Queued) -> None:
        """A taken request is done: it no longer counts towards the expected wait."""
        with self._ready:
            self._serving_cost_s = max(0.0, self._serving_cost_s - item.cost_s)
        if self._arrivals is not None:
            self._arrivals.finished(item.inbound.client_id, item.inbound.received)

    def close(self) -> None:
        """Make every ``take`` return None; what still waits is left unacknowledged, redelivered after a restart."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    # ---- inside the lock -------------------------------------------------------------------------

    def _push(self, queue: _ClientQueue, item: Queued) -> None:
        queue.items.append(item)
        queue.cost_s += item.cost_s
        queue.bytes += item.size
        self._requests += 1
        self._bytes += item.size
        self._cost_s += item.cost_s
        self._note_weight(item.inbound.client_id, queue)

    def _weight(self, queue: _ClientQueue) -> int:
        # Its share of the request bound plus its share of the byte bound, scaled to integers.
        return len(queue.items) * self.max_bytes + queue.bytes * self.max_requests

    def _note_weight(self, client: str, queue: _ClientQueue) -> None:
        half_full = 2 * self._requests > self.max_requests or 2 * self._bytes > self.max_bytes
        if not half_full:
            if self._tracking:
                self._tracking = False
                self._heaviest.clear()
            return
        if not self._tracking or len(self._heaviest) > 4 * len(self._queues) + 64:
            self._rebuild_heaviest()
            return
        heapq.heappush(self._heaviest, (-self._weight(queue), next(self._tiebreak), client))

    def _rebuild_heaviest(self) -> None:
        self._tracking = True
        self._heaviest = [(-self._weight(q), next(self._tiebreak), name) for name, q in self._queues.items()]
        heapq.heapify(self._heaviest)

    def _pop(self, client: str, queue: _ClientQueue, *, newest: bool) -> Queued:
        item = queue.items.pop() if newest else queue.items.popleft()
        queue.cost_s = max(0.0, queue.cost_s - item.cost_s) if queue.items else 0.0
        queue.bytes -= item.size
        self._requests -= 1
        self._bytes -= item.size
        self._cost_s = max(0.0, self._cost_s - item.cost_s) if self._requests else 0.0
        if not queue.items:
            del self._queues[client]
        else:
            self._note_weight(client, queue)
        return item

    def _shed_one(self) -> Queued:
        if not self._tracking:
            self._rebuild_heaviest()
        while True:
            weight, _, client = heapq.heappop(self._heaviest)
            queue = self._queues.get(client)
            if queue is not None and -weight == self._weight(queue):
                return self._pop(client, queue, newest=True)

    def _next_fair(self) -> Queued:
        # The client at the front is served while its deficit covers its next request; then the next
        # client's turn starts with one more quantum. A lone client just accumulates quanta.
        while True:
            client = self._active[0]
            queue = self._queues.get(client)
            if queue is None:
                self._active.popleft()
                self._in_rotation.discard(client)
                continue
            if queue.deficit_s >= queue.items[0].cost_s:
                item = self._pop(client, queue, newest=False)
                if client in self._queues:
                    queue.deficit_s -= item.cost_s
                return item
            self._active.rotate(-1)
            following = self._queues.get(self._active[0])
            if following is not None:
                following.deficit_s += self.quantum_s

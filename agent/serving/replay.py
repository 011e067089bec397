"""Replay protection: a request repeated within the window is answered with the reply already sent.

A client that retries (a lost reply, a reconnect, a QoS 1 redelivery) must not cost a second inference.
The reply is kept as the exact bytes published: it is signed and bound to the request's digest, client id
and request id, so re-sending those bytes answers the repeat correctly. The key is the client and the
request id; the payload digest must match too, so the same id with a different payload is a new request
(and its answer replaces the old one).

Memory is bounded in bytes (``[replay] max_bytes``): the least recently used answers go first. Entries
older than ``window_s`` are never returned and are dropped as they are met.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from agent.config import Replay

# What an entry costs the process beyond its reply, client id and digest bytes: the dict slot, key tuple,
# object headers and this record, plus what the allocator holds around them under LRU churn. Measured as
# the agent's RSS with the cache full (benchmarks/bench_clients, with and without the cache): ~600 bytes,
# where the objects alone are ~250; charging less would let the cache hold twice its max_bytes.
ENTRY_OVERHEAD_BYTES = 600
_Key = tuple[str, str | int]


@dataclass(slots=True)
class _Entry:
    digest: bytes
    reply: bytes
    stored: float
    cost: int


class ReplayCache:
    """Recent replies by (client, request id), bounded in bytes; safe to use from every worker thread."""

    def __init__(self, settings: Replay, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = settings.enabled
        self.window_s = settings.window_s
        self.max_bytes = settings.max_bytes
        self._clock = clock
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0

    @property
    def stored_bytes(self) -> int:
        """Bytes the kept entries are charged for (reply plus a fixed overhead each)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, client_id: str, request_id: str | int | None, digest: bytes) -> bytes | None:
        """The reply already sent for this exact request within the window, or None."""
        if not self.enabled or request_id is None:
            return None
        key = (client_id, request_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self._clock() - entry.stored > self.window_s:
                self._remove(key)
                return None
            if entry.digest != digest:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.reply

    def store(self, client_id: str, request_id: str | int | None, digest: bytes, reply: bytes) -> None:
        """Keep ``reply`` for repeats of this request; a reply too large for the whole cache is not kept.

        Notifications (no id) get no reply, so there is nothing to keep for them.
        """
        if not self.enabled or request_id is None:
            return
        cost = len(reply) + len(client_id) + len(digest) + ENTRY_OVERHEAD_BYTES
        key = (client_id, request_id)
        with self._lock:
            if key in self._entries:
                self._remove(key)
            if cost > self.max_bytes:
                return
            now = self._clock()
            self._drop_expired(now)
            while self._bytes + cost > self.max_bytes:
                self._remove(next(iter(self._entries)))
            self._entries[key] = _Entry(digest, reply, now, cost)
            self._bytes += cost

    def _drop_expired(self, now: float) -> None:
        # Least recently used first: expired entries gather at the front unless a repeat touched them.
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.stored <= self.window_s:
                return
            self._remove(key)

    def _remove(self, key: _Key) -> None:
        self._bytes -= self._entries.pop(key).cost

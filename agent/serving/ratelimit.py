"""Token buckets on incoming requests: one per client, one shared by all clients (``[rate_limit]``).

:meth:`RateLimiter.check` runs on the MQTT network thread for every request before it is queued, so it is
O(1): two bucket refills and a move to the end of an ordered dict, under one uncontended lock. Buckets are
a few lines; the libraries that offer them (``limits``, ``pyrate-limiter``) keep keys without a bound or
expire them from a thread of their own, whereas here a flood of client ids must not grow memory.

A client's bucket is checked before the global one, and a request takes a token from both only when both
have one: a client over its own rate is refused without using up the capacity the others share.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from agent.config import RateLimit

# Waiting exactly the advertised retry-after must be enough, whatever the float rounding of the refill.
_ROUNDING = 1e-9


class RateLimitRefusal(NamedTuple):
    """Why a request was refused: which bucket was empty and when it will hold a token again."""

    retry_after_s: float
    scope: Literal["client", "global"]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float

    def refill(self, now: float, rate: float, capacity: float) -> float:
        self.tokens = min(capacity, self.tokens + max(0.0, now - self.stamp) * rate)
        self.stamp = now
        return self.tokens


class RateLimiter:
    """Per-client and global token buckets; ``check`` admits a request (taking its tokens) or refuses it.

    At most ``settings.max_clients`` client buckets are kept. When a new client would exceed that, the
    client idle longest is forgotten; its bucket has had the longest to refill, so forgetting it (and
    starting it full if it comes back) gives it the least it could not have had anyway.
    """

    def __init__(self, settings: RateLimit, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = settings.enabled
        self.max_clients = settings.max_clients
        self._rate = settings.requests_per_s
        self._burst = float(settings.burst)
        self._global_rate = settings.global_requests_per_s
        # The shared bucket holds one second of the global rate, and at least one client's burst.
        self._global_burst = float(max(settings.burst, math.ceil(settings.global_requests_per_s)))
        self._clock = clock
        self._clients: OrderedDict[str, _Bucket] = OrderedDict()
        self._global = _Bucket(self._global_burst, clock())
        self._lock = threading.Lock()

    @property
    def tracked_clients(self) -> int:
        return len(self._clients)

    @property
    def global_burst(self) -> float:
        return self._global_burst

    def check(self, client_id: str) -> RateLimitRefusal | None:
        """Admit one request from ``client_id`` (None) or say why not and how long to wait."""
        if not self.enabled:
            return None
        with self._lock:
            now = self._clock()
            bucket = self._clients.get(client_id)
            if bucket is None:
                bucket = self._clients[client_id] = _Bucket(self._burst, now)
                if len(self._clients) > self.max_clients:
                    self._clients.popitem(last=False)
            else:
                self._clients.move_to_end(client_id)
            own = bucket.refill(now, self._rate, self._burst)
            if own < 1.0 - _ROUNDING:
                return RateLimitRefusal((1.0 - own) / self._rate, "client")
            shared = self._global.refill(now, self._global_rate, self._global_burst)
            if shared < 1.0 - _ROUNDING:
                return RateLimitRefusal((1.0 - shared) / self._global_rate, "global")
            bucket.tokens -= 1.0
            self._global.tokens -= 1.0
            return None

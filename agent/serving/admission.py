"""Where a request is **admitted**: the checks a request passes on the network thread before it is queued.

In order, cheapest first: a client over its rate with no answered refusals left (acknowledged unanswered),
payload size, the client's and the global rate, the process's memory. Whatever is refused here is never
parsed: its refusal carries the id :func:`~agent.serving.protocol.probe_request_id` finds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.config import Limits, RateLimit
from agent.errors import InvalidRequest, Overloaded, RateLimited, RequestError
from agent.exchange import InboundRequest
from agent.observe.audit import AuditTrail
from agent.observe.memory import MB
from agent.observe.metrics import Rejection
from agent.serving.ratelimit import RateLimiter, RateLimitRefusal


class MemoryGauge(Protocol):
    """The memory watchdog as admission sees it."""

    last_anon_rss_bytes: int

    def should_shed(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was not admitted; ``error`` None means acknowledged without an answer (a flood's excess)."""

    error: RequestError | None
    probe_id: bool = True  # read the request id from the payload for the refusal (not for oversized ones)
    to_default_topic: bool = False


class Admission:
    """The admission checks, and the per-client rate state they keep."""

    def __init__(
        self,
        limits: Limits,
        rate_limit: RateLimit,
        memory: MemoryGauge,
        audit: AuditTrail,
        *,
        count: Callable[[str], None],
        count_rejection: Callable[[Rejection], None],
    ) -> None:
        self._limits = limits
        self._memory = memory
        self._audit = audit
        self._count = count
        self._count_rejection = count_rejection
        self._rates = RateLimiter(rate_limit)
        # How many refusals each client is answered: each is a signed reply, so refusals are answered only
        # at the client's own admitted rate and a flooder cannot buy the network thread with them.
        self._answered_refusals = RateLimiter(rate_limit)

    def check(self, inbound: InboundRequest) -> Refusal | None:
        """None to admit ``inbound``; otherwise why not (already counted and audited)."""
        rate_refusal = self._rates.check(inbound.client_id)
        if rate_refusal is not None and self._answered_refusals.check(inbound.client_id) is not None:
            self._count_rate_refusal(rate_refusal)
            self._count("rate_limited_unanswered")
            return Refusal(None)
        size, limit = len(inbound.payload), self._limits.max_payload_bytes
        if size > limit:
            self._count("oversized")
            self._count_rejection("oversized")
            error = InvalidRequest(f"payload of {size} bytes exceeds the limit of {limit}")
            return Refusal(error, probe_id=False, to_default_topic=True)
        if rate_refusal is not None:
            return Refusal(self._rate_limited(inbound, rate_refusal))
        if self._memory.should_shed():
            self._count("overloaded_memory")
            self._count_rejection("overloaded")
            return Refusal(
                Overloaded(
                    f"agent memory {self._memory.last_anon_rss_bytes / MB:.0f} MB is above its soft limit of "
                    f"{self._limits.process_soft_limit_mb} MB; retry later"
                )
            )
        return None

    def _rate_limited(self, inbound: InboundRequest, refusal: RateLimitRefusal) -> RateLimited:
        retry_after_ms = max(1, math.ceil(refusal.retry_after_s * 1000))
        self._count_rate_refusal(refusal)
        self._audit.record("rate_limited", client_id=inbound.client_id, scope=refusal.scope, retry_after_ms=retry_after_ms)
        return RateLimited(
            f"rate limit exceeded ({refusal.scope}); retry after {retry_after_ms} ms",
            data={"retry_after_ms": retry_after_ms, "scope": refusal.scope},
        )

    def _count_rate_refusal(self, refusal: RateLimitRefusal) -> None:
        self._count(f"rate_limited_{refusal.scope}")
        self._count_rejection("rate_limited_client" if refusal.scope == "client" else "rate_limited_global")

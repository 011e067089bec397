"""Where a request is **admitted**: the checks a request passes on the network thread before it is queued,
and how many refusals each client is answered.

In order: the optional hard caps (token buckets, ``[rate_limit]``; off by default), payload
size, the process's memory. The deadline check and the fair buffer come after, in the dispatcher, which
knows what is waiting. Whatever is refused is never parsed: its refusal carries the id
:func:`~agent.serving.protocol.probe_request_id` finds.

Each refusal is a signed reply, so a client is answered at most ``limits.refusal_replies_per_s`` refusals
(after a burst of ``refusal_replies_burst``); beyond that its refused requests are acknowledged unanswered,
and a flooder cannot buy the network thread with them.
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

# Clients whose refusal budget is remembered at once (the least recently refused are forgotten).
_REFUSAL_CLIENTS = 4096


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
    """The admission checks, and the per-client state they keep (each map bounded)."""

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
        self._answered_refusals = RateLimiter(
            RateLimit(
                enabled=True,
                requests_per_s=limits.refusal_replies_per_s,
                burst=limits.refusal_replies_burst,
                global_requests_per_s=limits.refusal_replies_per_s * _REFUSAL_CLIENTS,
                max_clients=_REFUSAL_CLIENTS,
            )
        )

    @property
    def tracked_clients(self) -> int:
        """Clients whose rate or refusal budget is remembered (each bounded by its own maximum)."""
        return self._rates.tracked_clients + self._answered_refusals.tracked_clients

    def check(self, inbound: InboundRequest) -> Refusal | None:
        """None to admit ``inbound``; otherwise why not (counted and audited), answered within the budget."""
        refusal = self._refusal(inbound)
        if refusal is None or self.may_answer_refusal(inbound.client_id):
            return refusal
        self._count("refused_unanswered")
        return Refusal(None)

    def _refusal(self, inbound: InboundRequest) -> Refusal | None:
        rate_refusal = self._rates.check(inbound.client_id)
        if rate_refusal is not None:
            return Refusal(self._rate_limited(inbound, rate_refusal))
        size, limit = len(inbound.payload), self._limits.max_payload_bytes
        if size > limit:
            self._count("oversized")
            self._count_rejection("oversized")
            error = InvalidRequest(f"payload of {size} bytes exceeds the limit of {limit}")
            return Refusal(error, probe_id=False, to_default_topic=True)
        if self._memory.should_shed():
            self._count("overloaded_memory")
            self._count_rejection("memory")
            return Refusal(
                Overloaded(
                    f"agent memory {self._memory.last_anon_rss_bytes / MB:.0f} MB is above its soft limit of "
                    f"{self._limits.process_soft_limit_mb} MB; retry later",
                    data={"retry_after_ms": 1000},
                )
            )
        return None

    def may_answer_refusal(self, client_id: str) -> bool:
        """Whether ``client_id`` still has a refusal reply in its budget (taking it if so)."""
        return self._answered_refusals.check(client_id) is None

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

"""Every per-client structure has a maximum size, and 50,000 distinct client ids never take one past it.

A client id is whatever a client puts in its request topic, so a hostile client can send from as many ids as
it likes: each map keyed by client forgets (least recently used first) rather than grows.
"""

from __future__ import annotations

from agent.config import Limits, RateLimit, Replay
from agent.errors import RequestError
from agent.exchange import InboundRequest, payload_digest
from agent.observe.audit import AuditTrail
from agent.serving.admission import Admission
from agent.serving.dispatcher import ServiceCosts
from agent.serving.fallback import PENDING_OVERHEAD_BYTES, CloudFallback
from agent.serving.protocol import InferParams, Request
from agent.serving.intake import FairIntake, Queued
from agent.serving.ratelimit import RateLimiter
from agent.serving.replay import ReplayCache

CLIENTS = 50_000


def _inbound(client_id: str, n: int = 0) -> InboundRequest:
    return InboundRequest(
        client_id=client_id, payload=b'{"jsonrpc":"2.0","id":1,"method":"ping"}', mid=n, qos=1, generation=0,
        received=0.0, expires=None, response_topic=None, correlation_data=None,
    )  # fmt: skip


class _Shedding:
    """A memory gauge over its soft limit, so that every request is refused (and its refusal budgeted)."""

    last_anon_rss_bytes = 10**9

    def should_shed(self) -> bool:
        return True


def test_rate_limiter_buckets_stay_within_max_clients() -> None:
    limiter = RateLimiter(RateLimit(enabled=True, max_clients=1000))
    for n in range(CLIENTS):
        limiter.check(f"c{n}")
        assert limiter.tracked_clients <= 1000


def test_admission_refusal_budgets_stay_bounded() -> None:
    counted: list[str] = []
    admission = Admission(
        Limits(), RateLimit(enabled=True, max_clients=1000), _Shedding(), AuditTrail("dev", None),
        count=counted.append, count_rejection=lambda reason: None,
    )  # fmt: skip
    for n in range(CLIENTS):
        assert admission.check(_inbound(f"c{n}", n)) is not None
        assert admission.tracked_clients <= 1000 + 4096


def test_replay_cache_stays_within_its_bytes_whatever_the_clients() -> None:
    cache = ReplayCache(Replay(max_bytes=256 * 1024))
    for n in range(CLIENTS):
        cache.store(f"c{n}", 1, payload_digest(str(n).encode()), b"x" * 200)
        assert cache.stored_bytes <= 256 * 1024
    assert len(cache) < CLIENTS // 10


def test_audit_throttles_stay_within_max_tracked() -> None:
    trail = AuditTrail("dev", None, max_tracked=1024)
    for n in range(CLIENTS):
        trail.record("rate_limited", client_id=f"c{n}", retry_after_ms=1)
        assert trail.tracked <= 1024


def test_intake_queues_and_measured_costs_stay_bounded() -> None:
    intake = FairIntake(max_requests=4096, max_bytes=32 * 1024 * 1024, parallelism=2)
    costs = ServiceCosts(max_keys=256)
    for n in range(CLIENTS):
        intake.offer(Queued(_inbound(f"c{n}", n), 0.001))
        costs.observe((b"infer", f"model-{n}".encode()), 0.001)
        assert intake.figures().clients <= 4096 and len(costs) <= 256
    assert len(intake) == 4096


def test_cloud_fallback_budgets_and_pending_requests_stay_bounded() -> None:
    # Its per-client forwarding budgets are a rate limiter of their own; its pending requests are bounded
    # by bytes, each costing at least PENDING_OVERHEAD_BYTES, whatever the clients.
    max_pending_bytes = 64 * 1024
    fallback = CloudFallback(
        ["big"], enqueue=lambda body, ttl_s: f"m{body['client_id']}", relay=lambda context, reply: None,
        count=lambda name: None, max_pending_bytes=max_pending_bytes,
    )  # fmt: skip
    params = {"model": "big", "inputs": {}, "timeout_ms": 3_600_000}
    try:
        for n in range(CLIENTS):
            request = Request(jsonrpc="2.0", id=n, method="infer", params=params)
            try:
                fallback.forward(f"c{n}", request, InferParams(**params), n, held_bytes=0)
            except RequestError:
                pass  # over the pending bytes: refused with -32001, as it should be
            assert fallback._budget.tracked_clients <= fallback._budget.max_clients
            assert len(fallback._pending) <= max_pending_bytes // PENDING_OVERHEAD_BYTES
    finally:
        fallback.stop()

"""Per-client and global token buckets: rates, bursts, retry-after, isolation and bounded memory."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import RateLimit
from agent.serving.ratelimit import RateLimiter


class ManualClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: ManualClock, **values: object) -> RateLimiter:
    return RateLimiter(RateLimit(**{"enabled": True, **values}), clock=clock)


def test_a_client_gets_its_burst_then_its_rate() -> None:
    clock = ManualClock()
    limits = limiter(clock, requests_per_s=10.0, burst=5, global_requests_per_s=1000.0)
    assert [limits.check("alice") for _ in range(5)] == [None] * 5
    refusal = limits.check("alice")
    assert refusal is not None and refusal.scope == "client"
    assert math.isclose(refusal.retry_after_s, 0.1)
    clock.now += refusal.retry_after_s
    assert limits.check("alice") is None
    assert limits.check("alice") is not None


def test_an_idle_client_refills_to_its_burst_and_no_further() -> None:
    clock = ManualClock()
    limits = limiter(clock, requests_per_s=10.0, burst=3, global_requests_per_s=1000.0)
    for _ in range(3):
        limits.check("alice")
    clock.now += 3600
    admitted = sum(limits.check("alice") is None for _ in range(10))
    assert admitted == 3


def test_a_flooder_does_not_use_up_the_capacity_others_share() -> None:
    clock = ManualClock()
    limits = limiter(clock, requests_per_s=10.0, burst=4, global_requests_per_s=8.0)
    flood = [limits.check("flooder") for _ in range(1000)]
    assert sum(result is None for result in flood) == 4
    assert {result.scope for result in flood if result is not None} == {"client"}
    # The global bucket holds 8: the flooder's refused requests took none of what is left.
    assert [limits.check("normal") for _ in range(4)] == [None] * 4


def test_the_global_cap_refuses_every_client_once_spent() -> None:
    clock = ManualClock()
    limits = limiter(clock, requests_per_s=100.0, burst=2, global_requests_per_s=4.0)
    admitted = [limits.check(f"client-{n}") for n in range(6)]
    assert admitted[:4] == [None] * 4
    refusal = admitted[4]
    assert refusal is not None and refusal.scope == "global" and math.isclose(refusal.retry_after_s, 0.25)
    # A refusal by the global bucket leaves the client's own tokens alone.
    clock.now += 0.5
    assert limits.check("client-4") is None and limits.check("client-4") is None


def test_disabled_admits_everything() -> None:
    limits = limiter(ManualClock(), enabled=False, requests_per_s=1.0, burst=1, global_requests_per_s=1.0)
    assert all(limits.check("alice") is None for _ in range(100))


def test_a_flood_of_client_ids_keeps_only_the_most_recent() -> None:
    clock = ManualClock()
    limits = limiter(clock, requests_per_s=1.0, burst=1, global_requests_per_s=1e9, max_clients=100)
    for n in range(10_000):
        limits.check(f"id-{n}")
    assert limits.tracked_clients == 100
    assert limits.check("id-9999") is not None  # still tracked, still empty
    assert limits.check("id-0") is None  # forgotten long ago: starts full


events = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.floats(min_value=0.0, max_value=0.5)), max_size=300
)


@settings(max_examples=200, deadline=None)
@given(
    events=events,
    rate=st.floats(min_value=0.5, max_value=50.0),
    burst=st.integers(min_value=1, max_value=20),
    global_rate=st.floats(min_value=0.5, max_value=100.0),
)
def test_admissions_never_exceed_burst_plus_rate_times_elapsed(
    events: list[tuple[str, float]], rate: float, burst: int, global_rate: float
) -> None:
    clock = ManualClock()
    start = clock.now
    limits = limiter(clock, requests_per_s=rate, burst=burst, global_requests_per_s=global_rate)
    admitted: Counter[str] = Counter()
    for client, step in events:
        clock.now += step
        if limits.check(client) is None:
            admitted[client] += 1
    elapsed = clock.now - start
    for client, count in admitted.items():
        assert count <= burst + rate * elapsed + 1e-6, client
    assert sum(admitted.values()) <= limits.global_burst + global_rate * elapsed + 1e-6


@settings(max_examples=200, deadline=None)
@given(events=events, rate=st.floats(min_value=0.5, max_value=50.0), burst=st.integers(min_value=1, max_value=5))
def test_waiting_the_advertised_retry_after_is_enough(events: list[tuple[str, float]], rate: float, burst: int) -> None:
    clock = ManualClock()
    limits = limiter(clock, requests_per_s=rate, burst=burst, global_requests_per_s=1e6)
    for client, step in events:
        clock.now += step
        refusal = limits.check(client)
        if refusal is not None:
            assert refusal.scope == "client" and refusal.retry_after_s > 0
            clock.now += refusal.retry_after_s
            assert limits.check(client) is None


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.text(min_size=1, max_size=8), max_size=400), max_clients=st.integers(min_value=1, max_value=50))
def test_tracked_clients_never_exceed_the_bound(ids: list[str], max_clients: int) -> None:
    limits = limiter(ManualClock(), max_clients=max_clients)
    for client in ids:
        limits.check(client)
        assert limits.tracked_clients <= max_clients

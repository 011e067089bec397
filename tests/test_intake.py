"""The fair intake buffer: bounds, shedding from the heaviest client, per-client order, round-robin shares,
and the expected wait; a hypothesis state machine checks the invariants under any interleaving."""

from __future__ import annotations

from collections import Counter, deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.exchange import InboundRequest
from agent.serving.intake import ENTRY_OVERHEAD_BYTES, FairIntake, Queued

_mids = iter(range(1, 10**9))


def item(client: str, cost_s: float = 0.001, size: int = 10) -> Queued:
    inbound = InboundRequest(
        client_id=client, payload=b"x" * size, mid=next(_mids), qos=1, generation=0, received=0.0, expires=None,
        response_topic=None, correlation_data=None,
    )  # fmt: skip
    return Queued(inbound, cost_s)


def take_all(intake: FairIntake) -> list[Queued]:
    taken = []
    while (next_item := intake.take(timeout=0)) is not None:
        intake.finished(next_item)
        taken.append(next_item)
    return taken


def test_a_lone_clients_burst_that_fits_is_kept_whole_and_in_order() -> None:
    intake = FairIntake(max_requests=300, max_bytes=10**7, parallelism=2)
    burst = [item("camera") for _ in range(256)]
    assert all(intake.offer(queued) == [] for queued in burst)
    assert take_all(intake) == burst


def test_a_full_intake_sheds_the_newest_request_of_the_client_holding_the_most() -> None:
    intake = FairIntake(max_requests=6, max_bytes=10**7, parallelism=1)
    flood = [item("flooder") for _ in range(5)]
    for queued in flood:
        assert intake.offer(queued) == []
    assert intake.offer(item("paced")) == []
    # Full: the next arrival from anyone costs the flooder its newest request.
    assert intake.offer(item("paced")) == [flood[-1]]
    assert intake.offer(late := item("flooder")) == [late]
    assert len(intake) == 6


def test_the_byte_bound_sheds_a_client_with_few_large_requests() -> None:
    budget = 4 * (1000 + ENTRY_OVERHEAD_BYTES)
    intake = FairIntake(max_requests=100, max_bytes=budget, parallelism=1)
    frames = [item("camera", size=1000) for _ in range(4)]
    for frame in frames:
        assert intake.offer(frame) == []
    assert intake.offer(item("sensor", size=10)) == [frames[-1]]


def test_round_robin_gives_backlogged_clients_equal_service_time_whatever_their_request_costs() -> None:
    intake = FairIntake(max_requests=10_000, max_bytes=10**9, parallelism=1, quantum_s=0.005)
    for _ in range(1000):
        intake.offer(item("cheap", cost_s=0.001))
    for _ in range(100):
        intake.offer(item("dear", cost_s=0.010))
    served: Counter[str] = Counter()
    for _ in range(300):
        taken = intake.take(timeout=0)
        assert taken is not None
        served[taken.inbound.client_id] += taken.cost_s
        intake.finished(taken)
    # Equal shares of service time, within one quantum plus one request.
    assert abs(served["cheap"] - served["dear"]) <= 0.005 + 0.010 + 1e-9


def test_expected_wait_counts_others_only_up_to_the_clients_own_share() -> None:
    intake = FairIntake(max_requests=10_000, max_bytes=10**9, parallelism=2)
    for _ in range(100):
        intake.offer(item("flooder", cost_s=0.01))
    # A new client's request waits for about one of the flooder's requests, not for all hundred.
    assert intake.expected_wait_s("paced", 0.01) == pytest.approx(0.01 / 2)
    assert intake.expected_wait_s("flooder", 0.01) == pytest.approx(1.0 / 2)
    assert intake.expected_wait_s("flooder", 0.01, enough_s=10.0) == pytest.approx(1.0 / 2)


def test_close_makes_every_take_return_none() -> None:
    intake = FairIntake(max_requests=10, max_bytes=10**6, parallelism=1)
    intake.offer(item("a"))
    intake.close()
    assert intake.take(timeout=0) is None


class IntakeMachine(RuleBasedStateMachine):
    """Any mix of arrivals, shedding and service keeps the bounds, per-client order, and loses nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.intake = FairIntake(max_requests=12, max_bytes=12 * 200 + 3000, parallelism=2, quantum_s=0.002)
        self.offered: list[Queued] = []
        self.waiting: dict[str, deque[Queued]] = {client: deque() for client in "abcd"}
        self.shed: list[Queued] = []
        self.taken: list[Queued] = []

    @rule(client=st.sampled_from(["a", "b", "c", "d"]), cost=st.sampled_from([0.0005, 0.001, 0.004, 0.02]),
          size=st.integers(min_value=0, max_value=1500))  # fmt: skip
    def offer(self, client: str, cost: float, size: int) -> None:
        queued = item(client, cost_s=cost, size=size)
        self.offered.append(queued)
        self.waiting[client].append(queued)
        for dropped in self.intake.offer(queued):
            # Shed from the client holding the largest share of the buffer, newest first.
            weights = {name: self._weight(items) for name, items in self.waiting.items()}
            assert weights[dropped.inbound.client_id] == max(weights.values())
            assert self.waiting[dropped.inbound.client_id].pop() is dropped
            self.shed.append(dropped)

    def _weight(self, items: deque[Queued]) -> float:
        return len(items) / self.intake.max_requests + sum(q.size for q in items) / self.intake.max_bytes

    @precondition(lambda self: len(self.intake) > 0)
    @rule()
    def take(self) -> None:
        taken = self.intake.take(timeout=0)
        assert taken is not None
        assert self.waiting[taken.inbound.client_id].popleft() is taken
        self.taken.append(taken)
        self.intake.finished(taken)

    @invariant()
    def within_bounds(self) -> None:
        figures = self.intake.figures()
        assert figures.requests <= self.intake.max_requests and figures.bytes <= self.intake.max_bytes
        assert figures.clients <= figures.requests

    @invariant()
    def nothing_lost_or_duplicated(self) -> None:
        accounted = [id(q) for q in self.shed + self.taken]
        assert len(accounted) == len(set(accounted))
        assert len(accounted) + len(self.intake) == len(self.offered)

    @invariant()
    def each_client_is_served_in_arrival_order(self) -> None:
        for client in "abcd":
            mids = [q.inbound.mid for q in self.taken if q.inbound.client_id == client]
            assert mids == sorted(mids)


TestIntakeMachine = IntakeMachine.TestCase
TestIntakeMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)

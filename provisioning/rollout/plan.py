"""A rollout's plan (rings or an exponential ramp, deadlines, abort criteria) and the pure decisions on it.

Rings. ``rings`` are cumulative shares of the targeted devices: ``["1", "10%", "100%"]`` sends the document to
one device (the canary), then to whatever more makes 10 % of the fleet (at least one more), then to the rest.
``ramp = "exponential"`` doubles instead: 1, 2, 4, 8 ... devices per ring. A ring starts once every device of
the ring before has finished (succeeded, failed, or passed its deadline) and the rollout is not aborted.

Abort. A rollout aborts when at least ``min_finished`` devices have finished and more than
``max_failure_rate`` percent of those failed, or when a finished ring alone failed more than that (so one
failing canary stops the rollout whatever ``min_finished`` is).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.deploy.staged import ProbationPolicy

SUCCEEDED = frozenset({"active"})
FAILED = frozenset({"failed", "rolled_back", "timed_out", "refused"})
ENDED_OTHERWISE = frozenset({"cancelled", "superseded"})
FINISHED = SUCCEEDED | FAILED | ENDED_OTHERWISE
_RING = re.compile(r"^(\d+)(%?)$")


class RolloutPlan(BaseModel):
    """How a bundle reaches the targeted devices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rings: tuple[str, ...] = Field(("1", "10%", "100%"), description="cumulative counts or percentages")
    ramp: Literal["rings", "exponential"] = "rings"
    max_failure_rate: float = Field(10.0, ge=0, le=100, description="percent of finished devices that may fail")
    min_finished: int = Field(3, ge=1, description="devices finished before the failure rate is judged")
    device_deadline_s: float = Field(3600.0, gt=0, description="from a device's document to its end")
    deadline_s: float = Field(86400.0, gt=0, description="from the rollout's start to its end")
    activation: Literal["immediately", "maintenance_window"] = "immediately"
    probation: ProbationPolicy = ProbationPolicy()

    @field_validator("rings")
    @classmethod
    def _rings_parse(cls, rings: tuple[str, ...]) -> tuple[str, ...]:
        if not rings:
            raise ValueError("at least one ring")
        for ring in rings:
            match = _RING.match(ring.strip())
            if match is None or int(match.group(1)) == 0 or (match.group(2) and int(match.group(1)) > 100):
                raise ValueError(f"a ring is a device count (1, 5) or a percentage (10%, 100%), not {ring!r}")
        return tuple(ring.strip() for ring in rings)


def assign_rings(devices: list[str], plan: RolloutPlan) -> list[list[str]]:
    """The devices of each ring, in order; every device in exactly one ring, no ring empty."""
    total = len(devices)
    if plan.ramp == "exponential":
        bounds, size, reached = [], 1, 0
        while reached < total:
            reached = min(total, reached + size)
            bounds.append(reached)
            size *= 2
    else:
        bounds, reached = [], 0
        for ring in plan.rings:
            count, percent = _RING.match(ring).groups()  # type: ignore[union-attr]
            target = math.ceil(total * int(count) / 100) if percent else int(count)
            if reached < total:
                reached = min(total, max(target, reached + 1))
                bounds.append(reached)
        if reached < total:
            bounds.append(total)  # the rings named fewer devices than targeted: the rest form a last ring
    rings, start = [], 0
    for bound in bounds:
        rings.append(devices[start:bound])
        start = bound
    return rings


def abort_reason(plan: RolloutPlan, devices: Iterable[tuple[int, str]], issued_rings: int) -> str | None:
    """Why the rollout must abort, given (ring, state) of every device, or None."""
    rows = list(devices)
    finished = [state for _, state in rows if state in FINISHED]
    failed = sum(state in FAILED for state in finished)
    if len(finished) >= plan.min_finished and failed * 100 > plan.max_failure_rate * len(finished):
        return (f"{failed} of {len(finished)} finished devices failed, above {plan.max_failure_rate:g} % "
                f"(judged from {plan.min_finished} finished)")  # fmt: skip
    for ring in range(issued_rings):
        states = [state for number, state in rows if number == ring]
        if states and all(state in FINISHED for state in states):
            ring_failed = sum(state in FAILED for state in states)
            if ring_failed * 100 > plan.max_failure_rate * len(states):
                name = "the canary ring" if ring == 0 else f"ring {ring}"
                return f"{ring_failed} of {len(states)} devices of {name} failed, above {plan.max_failure_rate:g} %"
    return None


def ring_finished(devices: Iterable[tuple[int, str]], ring: int) -> bool:
    """Whether every device of ``ring`` has finished."""
    return all(state in FINISHED for number, state in devices if number == ring)

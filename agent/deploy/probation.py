"""The probation verdict on a newly activated model version: a pure function of what was observed.

The window ends after ``policy.requests`` runs or ``policy.seconds``, whichever comes first (with neither, at
once). Failures fail it as soon as they are certain to: more failed runs than the error rate allows over the
whole request window fail it before the window ends. At the end, the error rate over the runs seen is
compared with ``max_error_rate``, and, only if the policy asks (``max_latency_ratio``), the median latency
with the previous version's (measured in this process before the swap; without those figures the check is
skipped and the reason says so). A memory problem (the process over its soft limit, now or at its peak since the
previous poll; the version no longer within the model memory budget) fails it at any time; where memory could
only be sampled at the polls, a passing verdict says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.deploy.staged import ProbationPolicy, ProbationVerdict
from agent.models.stats import RunCounts


@dataclass(frozen=True)
class Observation:
    """What was seen of the new version since it was swapped in."""

    runs: RunCounts
    elapsed_s: float
    median_ms: float | None = None
    previous_median_ms: float | None = None
    memory_problem: str | None = None
    memory_note: str | None = None  # how memory was watched, when less than fully (said in a passing verdict)


def judge(policy: ProbationPolicy, version: str, seen: Observation) -> ProbationVerdict:
    """Whether version ``version`` is still ``watching``, has ``passed`` or has ``failed`` (with the reason)."""
    runs = seen.runs

    def verdict(state: str, reason: str | None = None) -> ProbationVerdict:
        return ProbationVerdict(state=state, reason=reason, requests=runs.total, errors=runs.failed)  # type: ignore[arg-type]

    if seen.memory_problem is not None:
        return verdict("failed", f"memory: {seen.memory_problem}")
    if policy.requests is not None and runs.failed > policy.max_error_rate * policy.requests:
        return verdict("failed", _error_reason(version, runs, policy))
    ended_by_requests = policy.requests is not None and runs.total >= policy.requests
    ended_by_time = policy.seconds is not None and seen.elapsed_s >= policy.seconds
    if not (ended_by_requests or ended_by_time or (policy.requests is None and policy.seconds is None)):
        return verdict("watching")
    if runs.total and runs.failed / runs.total > policy.max_error_rate:
        return verdict("failed", _error_reason(version, runs, policy))
    summary = f"version {version}: {runs.total} runs, {runs.failed} failed"
    if seen.memory_note is not None:
        summary = f"{summary}; {seen.memory_note}"
    if policy.max_latency_ratio is None:
        return verdict("passed", summary)
    if seen.median_ms is None or not seen.previous_median_ms:
        return verdict("passed", f"{summary}; latency not compared (no runs of both versions measured here)")
    ratio = seen.median_ms / seen.previous_median_ms
    if ratio > policy.max_latency_ratio:
        return verdict(
            "failed",
            f"latency: version {version}'s median run took {seen.median_ms:.2f} ms, {ratio:.2f}x the previous "
            f"version's {seen.previous_median_ms:.2f} ms (at most {policy.max_latency_ratio}x allowed)",
        )
    return verdict("passed", f"{summary}; median latency {ratio:.2f}x the previous version's")


def _error_reason(version: str, runs: RunCounts, policy: ProbationPolicy) -> str:
    return (
        f"errors: version {version} failed {runs.failed} of {runs.total} runs "
        f"(at most {policy.max_error_rate:.1%} allowed"
        + (f" over {policy.requests} requests)" if policy.requests is not None else ")")
    )

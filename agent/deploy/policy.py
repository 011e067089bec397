"""Rules a verified deployment is held to on this device: its target, its requirements, its deadlines."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from agent.deploy.documents import BundleManifest, DeploymentDocument
from agent.deploy.journal import DeploymentRecord
from agent.errors import DeployError


def check_target(document: DeploymentDocument, topic_kind: str, device_id: str, groups: list[str]) -> None:
    """Refuse a document not addressed to this device (or arriving on another target's topic)."""
    target = document.target
    if target.device is not None and (target.device != device_id or topic_kind != "device"):
        raise DeployError(f"deployment {document.deployment_id} is for device {target.device}, not this one")
    if target.group is not None and (target.group not in groups or topic_kind != "group"):
        raise DeployError(f"deployment {document.deployment_id} is for group {target.group}, not one of {groups}")


def check_requirements(manifest: BundleManifest, *, runtime: str, agent_version: str) -> None:
    """Refuse a bundle this device cannot run: runtime, accelerator, agent version."""
    needs = manifest.requirements
    if runtime not in needs.runtimes:
        raise DeployError(f"bundle {manifest.bundle_id} needs runtime {' or '.join(needs.runtimes)}, this is {runtime}")
    if needs.accelerator == "gpu" and runtime != "litert":
        raise DeployError(f"bundle {manifest.bundle_id} needs the GPU accelerator, which {runtime} does not offer")
    if _version_key(agent_version) < _version_key(needs.min_agent_version):
        raise DeployError(
            f"bundle {manifest.bundle_id} needs agent {needs.min_agent_version} or later, this is {agent_version}"
        )


class StepClock:
    """How long a deployment has been in its current step, measured on the monotonic clock.

    The journal's ``entered_at`` is wall-clock time, since it must outlive the process. A step this process
    moved a deployment into (:meth:`entered`) is timed from then on the monotonic clock, so a wall clock set
    forward or back mid-step (an NTP daemon's first sync on a board without a real-time clock) neither times
    the step out nor stretches it. A step it did not enter (resumed after a restart) carries over the
    wall-clock time since ``entered_at``, never negative: the only evidence that survives a restart, and what
    lets a step that crashes the agent each time still reach its deadline (a clock jump while the agent was
    down counts against that step).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall = wall
        # deployment -> (state, entered_at, start on the monotonic clock), for unfinished deployments only
        self._started: dict[str, tuple[str, float, float]] = {}

    def entered(self, record: DeploymentRecord) -> None:
        """``record`` was just moved into its state by this process (a terminal state: forgotten)."""
        if record.terminal:
            self._started.pop(record.deployment_id, None)
        else:
            self._started[record.deployment_id] = (record.state, record.entered_at, self._clock())

    def elapsed_s(self, record: DeploymentRecord) -> float:
        """Seconds ``record`` has spent in its current state."""
        known = self._started.get(record.deployment_id)
        if known is None or known[:2] != (record.state, record.entered_at):
            self._started[record.deployment_id] = known = (
                record.state, record.entered_at, self._clock() - max(0.0, self._wall() - record.entered_at)
            )  # fmt: skip
        return self._clock() - known[2]


def overdue(record: DeploymentRecord, document: DeploymentDocument, now: float, step_elapsed_s: float) -> str | None:
    """Why ``record`` has run out of time in its current state, or None (probation bounds itself).

    ``now`` (wall clock) is compared with the signed ``complete_by``; ``step_elapsed_s`` (a
    :class:`StepClock`'s) with the step deadlines.
    """
    deadlines = document.deadlines
    if record.state in ("probation", "active"):
        return None
    if deadlines.complete_by is not None and now > deadlines.complete_by:
        return f"not complete by its deadline {deadlines.complete_by:.0f} (was {record.state})"
    step_limit = {
        "received": deadlines.verify_s,
        "verified": deadlines.download_s,
        "downloading": deadlines.download_s,
        "activating": deadlines.activate_s,
    }.get(record.state)
    if step_limit is not None and step_elapsed_s > step_limit:
        return f"step {record.state} took longer than {step_limit:.0f} s"
    return None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)

"""When a deployment may be swapped in: at once, or inside the device's maintenance window.

Pure functions of the policy and the local wall-clock time the caller passes in (``datetime.now()``), so the
deployment state machine decides and tests check without a clock. A window that crosses midnight
(``23:00-01:00``) is inside from its start to midnight and from midnight to its end. Across a daylight saving
change the wait is counted in wall-clock time, so it may be an hour off; the state machine asks again when it
ends.
"""

from __future__ import annotations

from datetime import datetime, time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.config import MaintenanceWindow

DAY_S = 86_400.0

ActivationWhen = Literal["immediately", "maintenance_window"]


class ActivationPolicy(BaseModel):
    """A deployment document's activation policy, with the window from ``[deploy] maintenance_window``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    when: ActivationWhen = "immediately"
    window: MaintenanceWindow | None = Field(
        None, description="the device's window; None: none configured, so maintenance_window means at once"
    )


def in_maintenance_window(policy: ActivationPolicy, now: datetime) -> bool:
    """Whether a deployment under ``policy`` may be activated at local time ``now``."""
    return seconds_until_allowed(policy, now) == 0.0


def seconds_until_allowed(policy: ActivationPolicy, now: datetime) -> float:
    """Seconds from local time ``now`` until a deployment under ``policy`` may be activated (0.0: now)."""
    if policy.when == "immediately" or policy.window is None:
        return 0.0
    start, end = _seconds_of_day(policy.window.start), _seconds_of_day(policy.window.end)
    into = (_seconds_of_day(now.time()) - start) % DAY_S
    if into < (end - start) % DAY_S:
        return 0.0
    return DAY_S - into


def _seconds_of_day(moment: time) -> float:
    return moment.hour * 3600 + moment.minute * 60 + moment.second + moment.microsecond / 1e6

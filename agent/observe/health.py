"""The agent's health as the retained status carries it, and the live readings it and ``/metrics`` share.

Readings are taken only when asked for (the status refresh, a scrape), from callables the app provides,
so nothing here runs on the request path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from agent.errors import OutboxError
from agent.observe.memory import peak_rss_bytes, rss_bytes

log = logging.getLogger(__name__)

_PROC_SELF = Path("/proc/self")


class OutboxFigures(Protocol):
    """What health and metrics read from :meth:`agent.upstream.outbox.Outbox.stats` (an ``OutboxStats``)."""

    messages: int
    bytes: int
    oldest_age_s: float | None
    dead: int
    delivered: int
    write_errors: int
    corruption_events: int
    problem: str | None  # why new records cannot be stored now (disk full); None: they can

    @property
    def drops(self) -> Mapping[str, Mapping[str, int]]: ...  # a property: only a read-only member takes a dict of dicts


@dataclass(frozen=True)
class Probes:
    """Where live readings come from; each callable is cheap or runs off the request path.

    ``outbox_stats`` and ``cloud_state`` are None when the agent runs without a cloud link.
    """

    started: float
    intake_depth: Callable[[], int]
    intake_bytes: Callable[[], int] | None = None
    expected_wait_s: Callable[[], float] | None = None
    outbox_stats: Callable[[], OutboxFigures] | None = None
    cloud_state: Callable[[], str] | None = None
    model_accelerators: Callable[[], Mapping[str, str]] | None = None
    clock: Callable[[], float] = time.monotonic

    def read_outbox(self) -> OutboxFigures | None:
        """The outbox's figures, or None without an outbox or when it cannot answer (closed, failing)."""
        if self.outbox_stats is None:
            return None
        try:
            return self.outbox_stats()
        except OutboxError as exc:
            log.warning("outbox figures unavailable: %s", exc)
            return None


# First needed at the first health report (health_interval_s after start), not on the way to online.
_BUILT_ON_FIRST_USE = ConfigDict(defer_build=True)


class ProcessMemory(BaseModel):
    """Resident memory now and at its lifetime peak (VmHWM, kept across the resets probation makes)."""

    model_config = _BUILT_ON_FIRST_USE

    rss_bytes: int
    peak_rss_bytes: int


class OutboxHealth(BaseModel):
    model_config = _BUILT_ON_FIRST_USE

    messages: int
    bytes: int
    oldest_age_s: float | None
    dead: int
    problem: str | None = None  # why new upstream records cannot be stored now (disk full); local answers go on


class Health(BaseModel):
    """The periodic health part of the retained status document."""

    model_config = _BUILT_ON_FIRST_USE

    uptime_s: float
    load_average: tuple[float, float, float]
    memory: ProcessMemory | None
    intake_depth: int
    outbox: OutboxHealth | None
    cloud: str | None


def read_process_memory(proc_self: Path = _PROC_SELF) -> ProcessMemory | None:
    """This process's RSS and peak RSS; None where ``/proc`` does not have them."""
    try:
        return ProcessMemory(rss_bytes=rss_bytes(proc_self), peak_rss_bytes=peak_rss_bytes(proc_self))
    except (OSError, ValueError, IndexError):
        return None


def collect_health(probes: Probes) -> Health:
    """Read every health figure now."""
    outbox = probes.read_outbox()
    return Health(
        uptime_s=round(probes.clock() - probes.started, 3),
        load_average=os.getloadavg(),
        memory=read_process_memory(),
        intake_depth=probes.intake_depth(),
        outbox=None
        if outbox is None
        else OutboxHealth(
            messages=outbox.messages, bytes=outbox.bytes, oldest_age_s=outbox.oldest_age_s, dead=outbox.dead,
            problem=outbox.problem,
        ),
        cloud=probes.cloud_state() if probes.cloud_state is not None else None,
    )

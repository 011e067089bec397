"""Which CPUs benchmark processes run on: the responder under test on one core, everything else on the others.

On two shared cores the load generator, the brokers and the responder otherwise take turns on both, and a
throughput or latency figure then says as much about the scheduler as about the responder. Pinning puts the
responder under test (the agent, the baseline or the echo) alone on the last CPU this process may use, and
this process, and so every broker and load generator it starts, on the rest. The kernel's own view of each
process (``Cpus_allowed_list``) is what the results record.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


def cpu_list(cpus: Iterable[int]) -> str:
    """``{0, 2, 3}`` as ``"0,2,3"``: the form taskset and the results take."""
    return ",".join(str(cpu) for cpu in sorted(cpus))


def allowed_cpus(pid: int) -> str | None:
    """The kernel's ``Cpus_allowed_list`` of a process (``"0-1"``, ``"1"``); None once it has ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name == "Cpus_allowed_list":
            return value.strip()
    return None


def child_processes(pid: int) -> list[int]:
    """The direct children of ``pid``, from every thread's ``/proc/PID/task/TID/children``."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(child) for child in task.read_text().split()]
        except FileNotFoundError:  # the thread ended while being read
            continue
    return sorted(set(children))


def process_name(pid: int) -> str:
    """A short name for a process: its program and, for Python, the module it runs."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return "ended"
    program = Path(argv[0]).name
    if "-m" in argv[:-1]:
        return f"{program} -m {argv[argv.index('-m') + 1]}"
    return program


@dataclass(frozen=True)
class Placement:
    """Where the responder under test runs and where everything else runs; both None when not pinned."""

    responder: frozenset[int] | None
    others: frozenset[int] | None
    reason_unpinned: str | None = None

    @property
    def pinned(self) -> bool:
        return self.responder is not None

    def command(self, command: list[str]) -> list[str]:
        """``command`` started on the responder's CPUs (taskset execs it, so the process id is the same)."""
        if self.responder is None:
            return command
        return ["taskset", "--cpu-list", cpu_list(self.responder), *command]

    def describe(self) -> dict[str, object]:
        """The plan for the results JSON (what each process really had is recorded beside it)."""
        if self.responder is None or self.others is None:
            return {"pinned": False, "reason": self.reason_unpinned}
        return {"pinned": True, "responder_cpus": cpu_list(self.responder), "other_cpus": cpu_list(self.others)}


NOT_PINNED = Placement(None, None, "not asked")


def plan_placement(pin: bool, available: Iterable[int] | None = None) -> Placement:
    """Pinning for the CPUs this process may use (``available``, default its affinity): the last one for the
    responder under test, the rest for everything else; not pinned when asked not to or with a single CPU."""
    cpus = frozenset(os.sched_getaffinity(0) if available is None else available)
    if not pin:
        return Placement(None, None, "--no-pin")
    if len(cpus) < 2:
        return Placement(None, None, f"{len(cpus)} CPU available: nothing to pin apart")
    if shutil.which("taskset") is None:
        return Placement(None, None, "taskset (util-linux) not installed")
    responder = max(cpus)
    return Placement(frozenset({responder}), cpus - {responder})


class PinnedOrchestrator:
    """This process on the ``others`` CPUs while a run lasts, so that what it starts inherits them; the
    affinity it had is given back on ``close()`` (the in-process micro-benchmarks run after it)."""

    def __init__(self, placement: Placement) -> None:
        self._original: set[int] | None = None
        if placement.others is not None:
            self._original = os.sched_getaffinity(0)
            os.sched_setaffinity(0, placement.others)

    def close(self) -> None:
        if self._original is not None:
            os.sched_setaffinity(0, self._original)
            self._original = None

"""Model probes started at the very beginning of a start, so that they run beside it instead of before its models.

A probe (:mod:`agent.models.probe`) is a whole Python importing numpy and the runtime: about 0.1 s on an idle
x86 core, several times that on a Pi. Run when the agent first checks a file, its probes are paid one after the
other on the start path. :func:`probe_early` is called as soon as the settings are read, before the agent imports
its own modules: it reads the manifest (as plain JSON), and for every file whose verdict is neither bundled nor
known (in memory or in ``data_dir/model-probes.json``) it queues a probe on a thread of its own, one child at a
time (each holds 60 to 100 MB while it imports the runtime). Each child reads the file itself, as its stdin,
opened the way the agent opens model files, and reports the sha256 of what it read: the verdict is kept for that
content, never for what the manifest claims. :meth:`~agent.models.probe.ModelProbe.check` waits for the early
probe of the content it holds instead of starting one; if the file changed meanwhile, it probes as before.

Nothing here imports the runtime or numpy: the runtime's Interpreter module is found by name
(:func:`~agent.models.probe.interpreter_module`); if the agent then loads another one, the early verdicts are
kept under another key and its checks probe as before.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import Settings
from agent.errors import ModelError
from agent.models.catalog import MANIFEST_NAME, open_model_path
from agent.models.probe import (
    PROBE_TIMEOUT_S,
    EarlyProbe,
    run_child,
    allowance_for,
    expect_early,
    finish_early,
    interpreter_module,
    module_key,
)

log = logging.getLogger(__name__)


class EarlyProbes:
    """Probes of a manifest's unknown files, run one at a time on the thread ``model-probes``."""

    def __init__(self, module: str, allowance_bytes: int, state_dir: Path | None, timeout_s: float = PROBE_TIMEOUT_S):
        self.module = module
        self.allowance_bytes = allowance_bytes
        self.state_dir = state_dir
        self.timeout_s = timeout_s
        self.key = module_key(module, allowance_bytes)
        self._queue: list[tuple[Path, str, str, EarlyProbe]] = []

    def start(self, models_dir: Path) -> int:
        """Queue a probe of each file named in ``models_dir``'s manifest whose verdict is unknown and start them;
        returns how many were queued (a manifest that cannot be read queues none: the agent reports it)."""
        for model_id, file, digest in _manifest_files(models_dir):
            pending = expect_early(self.key, self.state_dir, digest)
            if pending is not None:
                self._queue.append((models_dir, file, model_id, pending))
        if self._queue:
            threading.Thread(target=self._run, name="model-probes", daemon=True).start()
        return len(self._queue)

    def _run(self) -> None:
        for models_dir, file, model_id, pending in self._queue:
            started, outcome = time.monotonic(), None
            try:
                with open_model_path(models_dir, file, model_id) as handle:
                    outcome = run_child(self.module, self.allowance_bytes, self.timeout_s, handle)
            except ModelError:
                pass  # the agent's own reading refuses the file and says why
            finally:  # whatever happened, a check waiting for this probe goes on (probing itself if need be)
                finish_early(self.key, self.state_dir, pending, outcome)
            if outcome is not None and outcome.verdict is None:
                elapsed_ms = (time.monotonic() - started) * 1000
                log.info("model file %s passed an early probe in %.0f ms: %s", file, elapsed_ms, outcome.passed)


def probe_early(settings: Settings) -> EarlyProbes | None:
    """Start probing the files of ``settings``' models folder whose verdicts are unknown (None: nothing to probe,
    or no second CPU to probe on: then each file is probed when the agent reaches it)."""
    module = interpreter_module(settings.inference.runtime)
    if settings.models_dir is None or module is None or not spare_cpu():
        return None
    try:
        early = EarlyProbes(module, allowance_for(settings.limits.process_soft_limit_mb), settings.data_dir)
    except ImportError:
        return None  # a broken runtime package: the agent's own import of it reports the problem
    return early if early.start(settings.models_dir) else None


def spare_cpu(cgroup_root: Path = Path("/sys/fs/cgroup"), own_groups: Path = Path("/proc/self/cgroup")) -> bool:
    """Whether this process may run on more than one CPU at once: its affinity and its cgroup's CPU quota
    (:func:`cpu_quota`; ``own_groups`` lists the process's groups, as ``/proc/self/cgroup`` does).

    On one CPU an early child only takes turns with the start it was meant to run beside, and the two together
    came online later than one after the other (measured with the agent pinned to one core of two)."""
    if len(os.sched_getaffinity(0)) < 2:
        return False
    quota = cpu_quota(cgroup_root, own_groups)
    return quota is None or quota >= 2


def cpu_quota(cgroup_root: Path, own_groups: Path) -> float | None:
    """The CPUs' worth of time this process's cgroup may use (None: unlimited, or no quota readable).

    cgroup v2 keeps it in the group's ``cpu.max`` ("max" or "QUOTA PERIOD"); cgroup v1 (Raspberry Pi OS
    bullseye, hybrid hosts, where v2's unified tree has no cpu controller) in ``cpu.cfs_quota_us`` (-1:
    unlimited) and ``cpu.cfs_period_us`` under the cpu controller's mount, named after its controllers
    (``cpu,cpuacct``). The first quota that reads is the one: a host mounts the cpu controller in one tree only."""
    try:
        lines = own_groups.read_text(encoding="ascii").splitlines()
    except (OSError, ValueError):
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        try:
            if hierarchy == "0" and not controllers:
                quota, period = (cgroup_root / group.lstrip("/") / "cpu.max").read_text(encoding="ascii").split()[:2]
                return None if quota == "max" else int(quota) / int(period)
            if "cpu" in controllers.split(","):
                folder = cgroup_root / controllers / group.lstrip("/")
                quota_us = int((folder / "cpu.cfs_quota_us").read_text(encoding="ascii"))
                period_us = int((folder / "cpu.cfs_period_us").read_text(encoding="ascii"))
                return None if quota_us < 0 else quota_us / period_us
        except (OSError, ValueError, ZeroDivisionError):
            continue  # not mounted here, or not readable: another tree may hold it
    return None


def _manifest_files(models_dir: Path) -> list[tuple[str, str, str]]:
    """(id, file, sha256) of each model of the manifest, read as plain JSON; none if it cannot be read so."""
    try:
        manifest: Any = json.loads((models_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        return [(str(entry["id"]), str(entry["file"]), str(entry["sha256"])) for entry in manifest["models"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("no early model probes: %s", exc)
        return []

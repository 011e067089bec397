"""The benchmark's CPU limits do what they claim: pinning runs a process on the CPU it names, and a cgroup CPU
quota holds a real busy loop to its share (checked from /proc), and is removed again, also on an exception.

The cgroup tests use the kernel's own /sys/fs/cgroup and are skipped where it is not writable (not root).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.budget import run_budget, verdicts
from benchmarks.cpu_quota import CpuController, CpuQuota, CpuQuotaUnavailable, pi4_core_cpus, quota_us
from benchmarks.harness import process_cpu_s
from benchmarks.placement import plan_placement
from benchmarks.scenarios import Timings

BUSY_LOOP = [sys.executable, "-c", "while True: pass"]


def test_pi4_core_share_is_the_mean_ratio_over_the_benchmarks_both_sides_have() -> None:
    pi4 = {"7-zip": 1000.0, "sysbench": 300.0}
    here = {"7-zip": 2000.0, "sysbench": 600.0, "only here": 1.0}
    assert pi4_core_cpus(pi4, here) == 0.5
    assert 0.0 < pi4_core_cpus() <= 1.0
    with pytest.raises(ValueError):
        pi4_core_cpus({"a": 1.0}, {"b": 1.0})


def test_quota_is_the_share_of_the_period_and_never_below_the_kernels_minimum() -> None:
    assert quota_us(0.46) == 4600
    assert quota_us(1.5, period_us=100_000) == 150_000
    with pytest.raises(ValueError, match="minimum"):
        quota_us(0.05)


def test_budget_rows_are_checked_against_the_seeds_targets() -> None:
    tiny = verdicts("tiny", {"req_per_s": 460.0, "p99_ms": 139.0})
    assert [(v["figure"], v["met"], v["verdict"]) for v in tiny] == [("req_per_s", False, "missed")]
    face = verdicts("face_image", {"req_per_s": 89.0, "p99_ms": None})
    assert [(v["figure"], v["met"], v["verdict"]) for v in face] == [("req_per_s", True, "ok"), ("p99_ms", None, "n/a")]


def test_placement_puts_the_responder_alone_on_the_last_cpu() -> None:
    placement = plan_placement(pin=True, available={0, 1, 2})
    assert (placement.responder, placement.others) == ({2}, {0, 1})
    assert placement.describe() == {"pinned": True, "responder_cpus": "2", "other_cpus": "0,1"}
    assert not plan_placement(pin=True, available={0}).pinned
    assert "1 CPU" in str(plan_placement(pin=True, available={0}).reason_unpinned)
    assert plan_placement(pin=False, available={0, 1}).describe() == {"pinned": False, "reason": "--no-pin"}


def test_a_pinned_command_runs_only_on_the_responders_cpu() -> None:
    placement = plan_placement(pin=True)
    if not placement.pinned:
        pytest.skip(f"not pinned here: {placement.reason_unpinned}")
    program = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    out = subprocess.run(placement.command(program), capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == str(sorted(placement.responder or ()))


@pytest.fixture
def controller() -> CpuController:
    try:
        return CpuController.find()
    except CpuQuotaUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def busy_loop() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(BUSY_LOOP)
    yield proc
    proc.kill()
    proc.wait()


def _cgroup_of(pid: int, controller: CpuController) -> Path:
    """The cgroup of ``pid`` in ``controller``'s hierarchy, from /proc/PID/cgroup."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller.version == 2 and controllers == "") or "cpu" in controllers.split(","):
            return controller.path / path.lstrip("/")
    raise AssertionError(f"no cpu cgroup line for {pid}")


def test_a_cpu_quota_holds_a_busy_loop_to_its_share(
    controller: CpuController, busy_loop: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    cpus = 0.2
    home = _cgroup_of(busy_loop.pid, controller)
    with CpuQuota(controller, f"edge-agent-test-{tmp_path.name}", cpus) as quota:
        quota.add(busy_loop.pid)
        assert quota.pids() == [busy_loop.pid]
        time.sleep(0.2)  # past the period it was moved in
        started, cpu_before = time.monotonic(), process_cpu_s(busy_loop.pid)
        time.sleep(1.0)
        elapsed, used = time.monotonic() - started, process_cpu_s(busy_loop.pid) - cpu_before
        # Generous: 50 % over the quota plus 50 ms for /proc's 10 ms ticks and a period straddling each end.
        # Unconfined, the loop would use close to `elapsed` seconds of CPU.
        assert 0.0 < used <= cpus * elapsed * 1.5 + 0.05, (used, elapsed)
        assert quota.stat()["nr_throttled"] > 0
    assert not quota.path.exists()
    assert _cgroup_of(busy_loop.pid, controller) == home


def test_a_cpu_quota_is_removed_and_its_processes_given_back_on_an_exception(
    controller: CpuController, busy_loop: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    home = _cgroup_of(busy_loop.pid, controller)
    with pytest.raises(RuntimeError):
        with CpuQuota(controller, f"edge-agent-test-{tmp_path.name}", 0.5) as quota:
            quota.add(busy_loop.pid)
            raise RuntimeError("interrupted")
    assert not quota.path.exists()
    assert _cgroup_of(busy_loop.pid, controller) == home


def test_without_write_access_to_the_cgroups_the_budget_scenario_is_skipped_with_its_reason() -> None:
    """As an unprivileged user (a forked child of a root run drops to nobody; a non-root run already is one)."""
    if os.geteuid() != 0:
        result = run_budget(Timings())
        assert "skipped" in result
        return
    # A fresh interpreter, not a fork (forking a process with threads can deadlock the child); it imports what
    # it needs as root, since nobody may not read the checkout, then drops to nobody.
    script = (
        "import json, os; from benchmarks.budget import run_budget; from benchmarks.scenarios import Timings; "
        "os.setgid(65534); os.setuid(65534); print(json.dumps(run_budget(Timings())))"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert "not writable" in result.get("skipped", ""), result

"""The model memory budget with real generated models and real interpreters: lazy loading, LRU eviction,
pinning, models too large, memory really returned; the RSS watchdog and the memory cgroup report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.config_loader import load_settings
from agent.errors import ModelError, ModelTooLarge, Overloaded
from agent.models.manager import ModelManager
from agent.observe.memory import (
    MB,
    MemoryWatchdog,
    _is_glibc,
    anon_rss_bytes,
    limit_malloc_arenas,
    measured_growth,
    memory_cgroup_report,
    peak_rss_bytes,
    rss_bytes,
    take_peak_anon_rss,
    trim_heap,
)
from tests.fixtures.generated_models import SIZED_INPUTS, add_model, sized_model

INPUT = {"x": np.ones((1, SIZED_INPUTS), dtype=np.float32)}


@pytest.fixture(scope="module")
def sized_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """m4, m8 and m12: float models with 4, 8 and 12 MB of weights (about 8, 16 and 24 MB loaded)."""
    models = tmp_path_factory.mktemp("sized") / "models"
    for size in (4, 8, 12):
        add_model(models, f"m{size}", sized_model(size), task="sized")
    return models


def _use(manager: ModelManager, model_id: str) -> None:
    with manager.lease(model_id) as loaded:
        loaded.run(INPUT)
    assert manager.memory_used_bytes <= manager.budget_bytes


def _pin(models: Path, *pinned: str) -> Path:
    """A copy of ``models`` (files linked) whose manifest pins ``pinned``."""
    manifest = json.loads((models / "manifest.json").read_text())
    for entry in manifest["models"]:
        entry["pinned"] = entry["id"] in pinned
    copy = models.parent / f"pinned-{'-'.join(pinned)}"
    copy.mkdir()
    for entry in manifest["models"]:
        (copy / entry["file"]).symlink_to(models / entry["file"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_models_load_on_first_use_and_the_least_recently_used_is_evicted(sized_dir: Path) -> None:
    manager = ModelManager(sized_dir, memory_budget_mb=40, max_concurrent_inferences=1)
    manager.verify_all()
    assert manager.loaded_ids == []
    _use(manager, "m4")
    _use(manager, "m8")
    assert manager.loaded_ids == ["m4", "m8"]
    _use(manager, "m4")  # m8 is now the least recently used
    _use(manager, "m12")
    assert sorted(manager.loaded_ids) == ["m12", "m4"]
    for model_id in ("m4", "m8", "m12"):
        stats = manager.stats(manager.entry(model_id))
        file_bytes = (sized_dir / f"{model_id}.tflite").stat().st_size
        assert stats.memory_bytes is not None and stats.memory_bytes > file_bytes  # file + measured interpreter
    for model_id in ("m8", "m12", "m4", "m12", "m8", "m4") * 2:
        _use(manager, model_id)
        assert model_id in manager.loaded_ids


def test_unloading_returns_the_memory_to_the_kernel(sized_dir: Path) -> None:
    manager = ModelManager(sized_dir, memory_budget_mb=40, max_concurrent_inferences=1)
    _use(manager, "m12")
    held = manager.memory_used_bytes
    before = rss_bytes()
    assert manager.unload_idle() == 1
    assert manager.loaded_ids == [] and manager.memory_used_bytes == 0
    assert before - rss_bytes() > held / 2


def test_pinned_models_load_at_start_and_are_never_evicted(sized_dir: Path) -> None:
    manager = ModelManager(_pin(sized_dir, "m8"), memory_budget_mb=50, max_concurrent_inferences=1)
    manager.verify_all()
    manager.load_pinned()
    assert manager.loaded_ids == ["m8"]
    for model_id in ("m4", "m12", "m4", "m12"):
        _use(manager, model_id)
        assert "m8" in manager.loaded_ids
    manager.unload_idle()
    assert manager.loaded_ids == ["m8"]


def test_pinned_models_that_do_not_fit_are_a_startup_error(sized_dir: Path) -> None:
    manager = ModelManager(_pin(sized_dir, "m8", "m12"), memory_budget_mb=30, max_concurrent_inferences=1)
    manager.verify_all()
    with pytest.raises(ModelError, match=r"pinned model 'm12' does not fit: .*needs 2\d\.\d MB .*budget of 30 MB less the 1\d\.\d MB held by pinned"):
        manager.load_pinned()


def test_a_file_larger_than_the_budget_is_refused_without_loading(tmp_path: Path) -> None:
    add_model(tmp_path, "big", sized_model(24), task="sized")
    manager = ModelManager(tmp_path, memory_budget_mb=20)
    manager.verify_all()
    with pytest.raises(ModelTooLarge, match=r"'big' needs 24\.\d MB \(its file alone\), more than the model memory budget of 20 MB") as caught, manager.lease("big"):
        pass
    assert caught.value.data["budget_mb"] == 20 and caught.value.data["needs_mb"] > 24
    assert manager.loaded_ids == [] and not manager.stats(manager.entry("big")).fits


def test_a_model_too_large_for_rpi4_1gb_names_both_numbers(tmp_path: Path) -> None:
    limits = load_settings(None, {"profile": "rpi4-1gb"}).limits
    assert limits.model_memory_mb == 60
    add_model(tmp_path, "wide", sized_model(32), task="sized")  # 32 MB file, about 64 MB once loaded
    # The profile's model budget, without its process soft limit: this test process is not the agent.
    manager = ModelManager(tmp_path, memory_budget_mb=limits.model_memory_mb, max_concurrent_inferences=1)
    manager.verify_all()
    for _ in range(2):  # measured once, then refused from the measurement without loading again
        with pytest.raises(ModelTooLarge, match=r"'wide' needs 6\d\.\d MB \(measured\), more than the model memory budget of 60 MB"), manager.lease("wide"):
            pass
        assert manager.loaded_ids == [] and manager.memory_used_bytes == 0


def test_a_model_in_use_is_not_evicted_until_its_request_ends(sized_dir: Path) -> None:
    manager = ModelManager(sized_dir, memory_budget_mb=34, max_concurrent_inferences=1, load_wait_s=0)
    with manager.lease("m8") as held:
        with pytest.raises(Overloaded, match="waiting for memory"), manager.lease("m12"):
            pass
        held.run(INPUT)
    _use(manager, "m12")
    assert manager.loaded_ids == ["m12"]

    waiting = ModelManager(sized_dir, memory_budget_mb=34, max_concurrent_inferences=1)
    served: list[str] = []
    with waiting.lease("m8") as held:
        thread = threading.Thread(target=lambda: (_use(waiting, "m12"), served.append("m12")))
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and served == []  # waits for the request holding m8
        held.run(INPUT)
    thread.join(30)
    assert served == ["m12"] and waiting.loaded_ids == ["m12"]


def test_loads_never_take_the_process_over_its_soft_limit(sized_dir: Path) -> None:
    manager = ModelManager(sized_dir, memory_budget_mb=100, max_concurrent_inferences=1)
    _use(manager, "m8")
    trim_heap()
    manager.process_limit_bytes = anon_rss_bytes() + 20 * MB
    _use(manager, "m12")
    assert manager.loaded_ids == ["m12"]  # m8 went, though the model budget had room for both
    assert anon_rss_bytes() < manager.process_limit_bytes

    fresh = ModelManager(sized_dir, memory_budget_mb=100, process_limit_mb=anon_rss_bytes() // MB + 4)
    with pytest.raises(Overloaded, match=r"loading model 'm8' \(about 16\.\d MB\) would take it over its soft limit"):
        _use(fresh, "m8")


def test_measured_growth_sees_a_real_allocation() -> None:
    with measured_growth() as growth:
        block = b"\x01" * (20 * MB)
    assert growth.bytes >= 19 * MB
    del block


def test_watchdog_sheds_load_and_unloads_idle_models_above_the_soft_limit(sized_dir: Path) -> None:
    manager = ModelManager(_pin(sized_dir, "m4"), memory_budget_mb=40, max_concurrent_inferences=1)
    manager.load_pinned()
    _use(manager, "m8")
    low = MemoryWatchdog(soft_limit_mb=1, relieve=manager.unload_idle)
    assert low.check() and low.should_shed()
    assert manager.loaded_ids == ["m4"]  # the idle model went, the pinned one stayed

    above_now = anon_rss_bytes() // MB + 100
    watchdog = MemoryWatchdog(soft_limit_mb=above_now, relieve=manager.unload_idle)
    assert not watchdog.check()
    ballast = b"\x01" * (120 * MB)
    assert watchdog.check() and watchdog.should_shed()
    del ballast
    assert not watchdog.check() and not watchdog.should_shed()


def _fake_root(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


PROC_CGROUPS = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t0\t1\t1\ncpu\t0\t1\t1\nmemory\t0\t{n}\t{enabled}\n"


def test_cgroup_report_raspberry_pi_kernel_with_memory_disabled(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, {
        "proc/cgroups": PROC_CGROUPS.format(n=1, enabled=0),
        "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io pids\n",
        "proc/self/cgroup": "0::/system.slice/edge-agent.service\n",
        "sys/fs/cgroup/system.slice/edge-agent.service/memory.max": "167772160\n",
    })
    report = memory_cgroup_report(root)
    assert report.controller_enabled is False and not report.enforced
    assert "disabled" in report.describe() and "MemoryMax= is ignored" in report.describe()


def test_cgroup_report_v2_with_a_limit_and_without(tmp_path: Path) -> None:
    files = {
        "proc/cgroups": PROC_CGROUPS.format(n=80, enabled=1),
        "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
        "proc/self/cgroup": "0::/system.slice/edge-agent.service\n",
        "sys/fs/cgroup/system.slice/edge-agent.service/memory.max": "167772160\n",
    }
    limited = memory_cgroup_report(_fake_root(tmp_path / "limited", files))
    assert limited.enforced and limited.limit_bytes == 160 * MB and "160 MB" in limited.describe()
    unlimited_files = {**files, "sys/fs/cgroup/system.slice/edge-agent.service/memory.max": "max\n"}
    unlimited = memory_cgroup_report(_fake_root(tmp_path / "unlimited", unlimited_files))
    assert unlimited.controller_enabled and unlimited.limit_bytes is None and not unlimited.enforced


def test_cgroup_report_v1_hierarchy_and_unreadable_roots(tmp_path: Path) -> None:
    v1 = _fake_root(tmp_path / "v1", {
        "proc/cgroups": PROC_CGROUPS.format(n=35, enabled=1),
        "proc/self/cgroup": "4:memory:/edge\n1:cpu,cpuacct:/\n",
        "sys/fs/cgroup/memory/edge/memory.limit_in_bytes": "268435456\n",
    })
    assert memory_cgroup_report(v1).limit_bytes == 256 * MB
    (v1 / "sys/fs/cgroup/memory/edge/memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_cgroup_report(v1).limit_bytes is None
    no_memory = _fake_root(tmp_path / "no-memory", {"proc/cgroups": "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t0\t1\t1\n"})
    assert memory_cgroup_report(no_memory).controller_enabled is False
    unknown = memory_cgroup_report(tmp_path / "empty")
    assert unknown.controller_enabled is None and "cannot tell" in unknown.describe()


def test_the_soft_limit_reading_leaves_out_file_backed_library_pages(tmp_path: Path) -> None:
    # As /proc/self/status shows an agent whose libraries the kernel caches in huge pages: 11 MB of RssFile.
    (tmp_path / "status").write_text("VmRSS:\t  131072 kB\nRssAnon:\t  110592 kB\nRssFile:\t   11264 kB\nRssShmem:\t    2048 kB\n")
    assert anon_rss_bytes(tmp_path) == (110592 + 2048) * 1024
    assert 0 < anon_rss_bytes() <= rss_bytes()


def _vm_hwm() -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))


def test_the_peak_since_the_last_reading_sees_a_freed_spike_and_the_lifetime_peak_survives_the_reset() -> None:
    take_peak_anon_rss()  # whatever came before this test
    before = anon_rss_bytes()
    buffer = b"\x01" * (64 * MB)
    del buffer
    peak = take_peak_anon_rss()
    assert peak is not None and peak >= before + 60 * MB
    assert anon_rss_bytes() < before + 16 * MB  # the spike is gone: only the peak saw it
    # The kernel's peak went back to what is resident now; the lifetime peak (/metrics) did not.
    assert _vm_hwm() < before + 60 * MB + (rss_bytes() - anon_rss_bytes())
    assert peak_rss_bytes() >= peak
    again = take_peak_anon_rss()
    assert again is not None and again < before + 16 * MB  # a new window: the old spike is not counted twice


def test_without_a_writable_clear_refs_there_is_no_peak_since_the_last_reading(tmp_path: Path) -> None:
    (tmp_path / "status").write_text("VmHWM:\t  262144 kB\nVmRSS:\t  131072 kB\nRssAnon:\t  110592 kB\n"
                                     "RssFile:\t   11264 kB\nRssShmem:\t    2048 kB\n")
    assert take_peak_anon_rss(tmp_path) is None  # no clear_refs (a kernel without CONFIG_PROC_PAGE_MONITOR)
    (tmp_path / "clear_refs").mkdir()  # one that cannot be written
    assert take_peak_anon_rss(tmp_path) is None
    assert peak_rss_bytes(tmp_path) == 262144 * 1024


# Four threads allocate at once, each holding its first block until all have one; malloc_stats() then lists
# one "Arena N:" per arena on stderr. glibc gives each new thread an arena of its own while under its cap.
_ARENAS_PROGRAM = """
import ctypes, sys, threading
from agent.observe.memory import limit_malloc_arenas
applied = limit_malloc_arenas(1) if sys.argv[1] == "cap" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
barrier = threading.Barrier(4)
def allocate():
    block = libc.malloc(4096)
    barrier.wait()
    libc.free(ctypes.c_void_p(block))
threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(applied)
libc.malloc_stats()
"""


def _arenas(mode: str, **env: str) -> tuple[str, int]:
    environment = {name: value for name, value in os.environ.items() if name != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", _ARENAS_PROGRAM, mode], capture_output=True, text=True, check=True,
        env={**environment, **env},
    )
    return done.stdout.strip(), done.stderr.count("Arena ")


@pytest.mark.skipif(not _is_glibc(), reason="malloc arenas are glibc's")
def test_the_malloc_arena_cap_keeps_threads_in_the_arenas_allowed() -> None:
    assert _arenas("none") == ("None", 5)  # the main thread's and one per thread
    assert _arenas("cap") == ("True", 1)
    # An operator's MALLOC_ARENA_MAX (the systemd unit sets one) is left as it is.
    assert _arenas("cap", MALLOC_ARENA_MAX="3") == ("False", 3)


def test_the_malloc_arena_cap_is_not_tried_on_other_c_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr(os, "confstr", lambda name: None)  # what musl answers: no glibc version
    assert limit_malloc_arenas() is False

"""The process's own memory: measuring it, giving freed memory back, and a watchdog over a soft limit.

Model costs are measured, not guessed from file sizes: :func:`measured_growth` samples RSS and PSS around
an allocation. glibc keeps freed memory in its arenas and hands it out again, so a plain before/after
difference under-counts whatever reuses old free space; each measurement therefore starts with
``malloc_trim(0)`` (free memory goes back to the kernel first, then every new page shows up as growth).
Measurements are serialised process-wide so that two interpreters created at once are not counted twice.

Soft-limit decisions (the watchdog, and the model manager's room to load) read :func:`anon_rss_bytes`,
the resident memory that is not a cached file: heap, interpreters, model bytes, shared memory. The rest of
RSS is shared library code and data mapped from files (LiteRT, numpy, cryptography): clean page cache the
kernel can drop and re-read, whose resident size depends on how the kernel caches those files (a kernel
that maps them with 2 MB huge pages shows ~11 MiB more on an rpi4-1gb agent), and which neither unloading
a model nor shedding requests can shrink. Counting it made the limit unreachable by relief: the agent
could refuse a model for good at a few MiB below its limit. Model growth and the peak reported in
/metrics stay plain RSS/PSS (what the model really adds; what the board really carries).

Probation of a newly deployed model (agent/deploy) must see a short spike between its polls, so
:func:`take_peak_anon_rss` reads the peak since its previous call and resets it (``VmHWM`` reset through
``/proc/self/clear_refs``). The lifetime peak the metrics report stays a lifetime peak across those resets:
:func:`peak_rss_bytes` keeps the highest VmHWM seen before each reset.

Raspberry Pi kernels ship with the memory cgroup disabled, which makes systemd's ``MemoryMax=`` a no-op;
:func:`memory_cgroup_report` says whether the kernel will enforce any limit on this process at all.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.periodic import PeriodicTask

log = logging.getLogger(__name__)

MB = 1024 * 1024
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# A cgroup v1 "no limit" is reported as the largest page-aligned 63-bit number.
_UNLIMITED_V1 = 1 << 62
_MEASURE_LOCK = threading.Lock()
_PROC_SELF = Path("/proc/self")
# "5" resets the process's peak RSS (VmHWM) to its current RSS (Linux 4.0+); no other bit of clear_refs is touched.
_RESET_PEAK = b"5"
_PEAK_LOCK = threading.Lock()
# The highest VmHWM read just before a reset of the peak: the lifetime peak once VmHWM has been reset.
_peak_before_resets = 0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to trim
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


_TRIM = _malloc_trim()

# glibc's mallopt() parameter for the arena cap (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8
# The arenas the agent allows itself: as many as the shipped systemd unit's MALLOC_ARENA_MAX.
MALLOC_ARENAS = 2


def limit_malloc_arenas(count: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``count``; call it before any thread starts. True if the cap was set.

    glibc hands a thread that finds the arenas busy a new arena of its own, up to eight per core, and each
    arena keeps the free space of its own churn. The full agent's threads (workers, MQTT network thread,
    outbox writer, uplink drain, TPM) grew to six arenas under load, with ~4 MB free in them, never returned:
    measured on the benchmark's tiny load, the peak RSS went from 113 to 110 MB with two arenas, at the same CPU
    per reply (glibc's per-thread caches serve most small allocations without the arena lock, and Python
    objects of up to 512 bytes come from pymalloc under the GIL anyway).

    Nothing is changed when ``MALLOC_ARENA_MAX`` is set (glibc has applied the operator's choice already) or
    on another C library: musl and macOS have no per-thread arenas to cap, and no ``M_ARENA_MAX``.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not _is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))


def _is_glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):  # not a name this platform knows, or a C library that is not glibc
        return False


def rss_bytes(proc_self: Path = Path("/proc/self")) -> int:
    """Resident set size now (from ``statm``, the cheapest source)."""
    return int((proc_self / "statm").read_text().split()[1]) * _PAGE_SIZE


def anon_rss_bytes(proc_self: Path = Path("/proc/self")) -> int:
    """Resident memory unloading or shedding can affect: ``RssAnon + RssShmem`` (RSS less file-backed pages).

    Falls back to plain RSS on kernels before 4.5, which lack those lines.
    """
    fields = {}
    for line in (proc_self / "status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssShmem:")):
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    if len(fields) < 2:
        return rss_bytes(proc_self)
    return fields["RssAnon"] + fields["RssShmem"]


def pss_bytes(proc_self: Path = Path("/proc/self")) -> int | None:
    """Proportional set size (shared pages split between their users), or None before Linux 4.14."""
    try:
        text = (proc_self / "smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None


def peak_rss_bytes(proc_self: Path = _PROC_SELF) -> int:
    """The high-water mark of the resident set since the process started.

    That is ``VmHWM``, or, once :func:`take_peak_anon_rss` has reset VmHWM, the highest value it had before.
    """
    peak = _status_kib(proc_self).get("VmHWM")
    if peak is None:
        raise OSError(f"{proc_self}/status has no VmHWM line")
    return max(peak * 1024, _peak_before_resets) if proc_self == _PROC_SELF else peak * 1024


def take_peak_anon_rss(proc_self: Path = _PROC_SELF) -> int | None:
    """Anonymous resident memory at its highest since the previous call, then the kernel's peak reset.

    The kernel keeps the peak of all resident memory (``VmHWM``), not of its anonymous part: the file-backed
    part (library code, steady while the agent runs) is taken as it is now, so the figure compares with
    :func:`anon_rss_bytes` and the soft limit. A spike in the instant between reading and resetting is lost.
    Returns None where the peak cannot be reset (no writable ``clear_refs``: a kernel before 4.0 or without
    ``CONFIG_PROC_PAGE_MONITOR``, a sandbox, a process made non-dumpable): the caller then only has samples.
    """
    global _peak_before_resets
    with _PEAK_LOCK:
        fields = _status_kib(proc_self)
        if "VmHWM" not in fields:
            return None
        peak = fields["VmHWM"] * 1024
        if proc_self == _PROC_SELF:
            _peak_before_resets = max(_peak_before_resets, peak)  # before the reset: readers never see it drop
        try:
            descriptor = os.open(proc_self / "clear_refs", os.O_WRONLY)  # never created where it is missing
            try:
                os.write(descriptor, _RESET_PEAK)
            finally:
                os.close(descriptor)
        except OSError:
            return None
        if "RssAnon" not in fields or "RssShmem" not in fields:  # before Linux 4.5: as anon_rss_bytes, all of RSS
            return peak
        anon = (fields["RssAnon"] + fields["RssShmem"]) * 1024
        file_backed = fields["VmRSS"] * 1024 - anon
        return max(anon, peak - file_backed)


def _status_kib(proc_self: Path) -> dict[str, int]:
    """The ``kB`` figures of ``status`` by name (``VmHWM``, ``VmRSS``, ``RssAnon``...)."""
    fields = {}
    for line in (proc_self / "status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.endswith(" kB"):
            fields[name] = int(value.split()[0])
    return fields


def trim_heap() -> None:
    """Return the allocator's free memory to the kernel (glibc ``malloc_trim(0)``; a no-op elsewhere)."""
    if _TRIM is not None:
        _TRIM(0)


def return_freed_memory() -> None:
    """After dropping large objects: collect cycles, then hand the freed pages back to the kernel."""
    gc.collect()
    trim_heap()


@dataclass
class Growth:
    """Memory a measured block added: the larger of the RSS and PSS increases, never negative."""

    rss_bytes: int = 0
    pss_bytes: int | None = None

    @property
    def bytes(self) -> int:
        return max(0, self.rss_bytes, self.pss_bytes or 0)


@contextmanager
def measured_growth() -> Iterator[Growth]:
    """Measure what the block allocates; blocks measuring at the same time wait for each other."""
    with _MEASURE_LOCK:
        trim_heap()
        rss_before, pss_before = rss_bytes(), pss_bytes()
        growth = Growth()
        yield growth
        growth.rss_bytes = rss_bytes() - rss_before
        pss_after = pss_bytes()
        if pss_before is not None and pss_after is not None:
            growth.pss_bytes = pss_after - pss_before


@dataclass(frozen=True)
class CgroupReport:
    """Whether the kernel's memory cgroup is on, and the limit it puts on this process, if any."""

    controller_enabled: bool | None
    limit_bytes: int | None
    evidence: str

    @property
    def enforced(self) -> bool:
        """True only when the kernel will actually stop this process at some memory limit."""
        return bool(self.controller_enabled) and self.limit_bytes is not None

    def describe(self) -> str:
        if self.controller_enabled is None:
            return f"cannot tell whether the kernel enforces memory limits ({self.evidence})"
        if not self.controller_enabled:
            return (
                f"the kernel's memory cgroup is disabled ({self.evidence}): systemd MemoryMax= is ignored, "
                "the agent's own limits are all that keeps it in budget"
            )
        if self.limit_bytes is None:
            return f"memory cgroup enabled ({self.evidence}), but this process's cgroup sets no memory limit"
        return f"memory cgroup enabled ({self.evidence}); the kernel limits this process to {self.limit_bytes / MB:.0f} MB"


def memory_cgroup_report(root: Path = Path("/")) -> CgroupReport:
    """Read ``/proc/cgroups``, ``/sys/fs/cgroup/cgroup.controllers`` and this process's cgroup under ``root``."""
    evidence: list[str] = []
    v1_enabled = _proc_cgroups_memory(root / "proc/cgroups")
    if v1_enabled is not None:
        evidence.append(f"/proc/cgroups: memory enabled={int(v1_enabled)}")
    v2_controllers = _read(root / "sys/fs/cgroup/cgroup.controllers")
    v2_enabled = None if v2_controllers is None else "memory" in v2_controllers.split()
    if v2_enabled is not None:
        evidence.append(f"cgroup v2 controllers {'include' if v2_enabled else 'lack'} memory")
    if v1_enabled is None and v2_enabled is None:
        return CgroupReport(None, None, "neither /proc/cgroups nor /sys/fs/cgroup/cgroup.controllers is readable")
    # /proc/cgroups lists a controller with enabled=0 when the kernel command line disabled it; the v2 root
    # lists only controllers that are on. Either positive sign means the controller works somewhere.
    enabled = bool(v1_enabled) or bool(v2_enabled)
    limit = _own_memory_limit(root) if enabled else None
    return CgroupReport(enabled, limit, "; ".join(evidence))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _proc_cgroups_memory(path: Path) -> bool | None:
    text = _read(path)
    if text is None:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == "memory":
            return fields[3] == "1"
    # The file exists but does not list memory: the kernel was built without it.
    return False


def _own_memory_limit(root: Path) -> int | None:
    """This process's memory limit from its cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``)."""
    membership = _read(root / "proc/self/cgroup") or ""
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":
            value = _read(root / "sys/fs/cgroup" / relative / "memory.max")
        elif "memory" in controllers.split(","):
            value = _read(root / "sys/fs/cgroup/memory" / relative / "memory.limit_in_bytes")
        else:
            continue
        if value is not None and value.strip().isdigit() and int(value) < _UNLIMITED_V1:
            return int(value)
    return None


class MemoryWatchdog:
    """Samples :func:`anon_rss_bytes`; above the soft limit it asks for load shedding and calls ``relieve``.

    ``relieve`` (the model manager unloading idle models) runs on the watchdog thread each time a sample is
    over the limit. Shedding stops once RSS is back below ``resume_fraction`` of the soft limit, so the
    agent does not flap between shedding and serving around the limit.
    """

    def __init__(
        self,
        soft_limit_mb: int,
        relieve: Callable[[], None],
        *,
        interval_s: float = 0.5,
        resume_fraction: float = 0.95,
        proc_self: Path = Path("/proc/self"),
    ) -> None:
        self.soft_limit_bytes = soft_limit_mb * MB
        self.resume_bytes = int(self.soft_limit_bytes * resume_fraction)
        self.interval_s = interval_s
        self._relieve = relieve
        self._proc_self = proc_self
        self._shedding = False
        self.last_anon_rss_bytes = 0
        # Outlives a bug in relieve(): it is what keeps the agent inside its memory.
        self._task = PeriodicTask("memory-watchdog", "memory_watchdog", interval_s, self.check)

    def should_shed(self) -> bool:
        """Whether new requests should be refused as overloaded (cheap: reads the last sample)."""
        return self._shedding

    def check(self) -> bool:
        """Take one sample now (relieving memory if over the limit); returns whether load is being shed."""
        rss = anon_rss_bytes(self._proc_self)
        if rss >= self.soft_limit_bytes:
            self._relieve()
            rss = anon_rss_bytes(self._proc_self)
        if not self._shedding and rss >= self.soft_limit_bytes:
            log.warning(
                "anonymous resident memory %.0f MB is above the soft limit of %.0f MB after unloading idle models: shedding load",
                rss / MB, self.soft_limit_bytes / MB,
            )
            self._shedding = True
        elif self._shedding and rss < self.resume_bytes:
            log.info("resident memory (anonymous) back to %.0f MB: serving again", rss / MB)
            self._shedding = False
        self.last_anon_rss_bytes = rss
        return self._shedding

    def start(self) -> None:
        self._task.start()

    def stop(self) -> None:
        self._task.stop()

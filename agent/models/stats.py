"""What this device has measured about its models: memory, load time, latency, and runs answered and failed.

Figures are kept per model version (id and sha256) so that a new version starts afresh, and they outlive
unloading: the budget and the router keep using a model's measured memory after it was evicted. The runs
answered and failed, and the median of the recent latencies, are what a deployment's probation watches
(:mod:`agent.deploy.probation`).
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass

LATENCY_EWMA_ALPHA = 0.2
# Recent run latencies kept per model version for its median: enough for a probation window's comparison.
LATENCY_SAMPLES = 256


@dataclass(frozen=True)
class RunCounts:
    """Runs of one model version since the process started: answered, and failed in the model itself."""

    answered: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.answered + self.failed


@dataclass(frozen=True)
class ModelStats:
    """What the model manager knows about one model for routing and ``models/list``."""

    loaded: bool
    memory_bytes: int | None
    latency_ms: float | None
    load_ms: float | None
    fits: bool


class Measurements:
    """Measured figures, safe to record and read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memory: dict[tuple[str, str], int] = {}
        self._load_ms: dict[tuple[str, str], float] = {}
        self._latency: dict[str, tuple[str, float]] = {}  # servable id -> (version, average ms)
        self._runs: dict[tuple[str, str], RunCounts] = {}
        self._recent: dict[tuple[str, str], deque[float]] = {}

    def record_load(self, model_id: str, version: str, memory_bytes: int, load_ms: float) -> None:
        with self._lock:
            self._memory[(model_id, version)] = memory_bytes
            self._load_ms[(model_id, version)] = load_ms

    def memory_bytes(self, model_id: str, version: str) -> int | None:
        """The memory the model held after its last load (its file plus one interpreter)."""
        with self._lock:
            return self._memory.get((model_id, version))

    def load_ms(self, model_id: str, version: str) -> float | None:
        with self._lock:
            return self._load_ms.get((model_id, version))

    def record_latency(self, servable_id: str, version: str, milliseconds: float) -> None:
        """Fold one run's duration into an exponentially weighted average (restarted for a new version)."""
        with self._lock:
            self._fold_latency(servable_id, version, milliseconds)

    def _fold_latency(self, servable_id: str, version: str, milliseconds: float) -> None:
        previous = self._latency.get(servable_id)
        if previous is None or previous[0] != version:
            self._latency[servable_id] = (version, milliseconds)
        else:
            self._latency[servable_id] = (version, previous[1] + LATENCY_EWMA_ALPHA * (milliseconds - previous[1]))

    def latency_ms(self, servable_id: str, version: str) -> float | None:
        with self._lock:
            recorded = self._latency.get(servable_id)
        return recorded[1] if recorded is not None and recorded[0] == version else None

    def record_run(self, model_id: str, version: str, milliseconds: float) -> None:
        """One run of a model version answered in ``milliseconds``: counted, and folded into its latencies."""
        key = (model_id, version)
        with self._lock:
            self._fold_latency(model_id, version, milliseconds)
            # Once per inference: no default RunCounts or deque built only to be thrown away (~0.7 us).
            counts = self._runs.get(key)
            self._runs[key] = RunCounts(1) if counts is None else RunCounts(counts.answered + 1, counts.failed)
            recent = self._recent.get(key)
            if recent is None:
                recent = self._recent[key] = deque(maxlen=LATENCY_SAMPLES)
            recent.append(milliseconds)

    def record_failure(self, model_id: str, version: str) -> None:
        """One run of a model version failed in the model (it would not load, or the interpreter raised)."""
        key = (model_id, version)
        with self._lock:
            counts = self._runs.get(key, RunCounts())
            self._runs[key] = RunCounts(counts.answered, counts.failed + 1)

    def runs(self, model_id: str, version: str) -> RunCounts:
        """Runs of a model version answered and failed since the process started."""
        with self._lock:
            return self._runs.get((model_id, version), RunCounts())

    def median_latency_ms(self, model_id: str, version: str) -> float | None:
        """The median of a model version's recent run latencies (None before its first run)."""
        with self._lock:
            recent = list(self._recent.get((model_id, version), ()))
        return statistics.median(recent) if recent else None

"""Per model, CPU (XNNPACK) against LiteRT's GPU accelerator: latency, the model's measured memory and RSS.

Run: ``python -m benchmarks.bench_accelerators``. Each accelerator runs in a process of its own (the RSS
figures are that process's), loading the bundled models and the MediaPipe face detector through the
model manager, then timing single inferences on one thread. Here the GPU is Mesa's lavapipe, a Vulkan
driver that runs on the CPU: it is slower than XNNPACK, the point is that the GPU path runs and is
measured. Without a Vulkan device the GPU rows say the models fell back to CPU.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.models.devmodels import add_face_detector, copy_bundled_models
from agent.models.manager import ModelManager
from agent.observe.memory import MB, rss_bytes

ACCELERATORS = ("cpu", "gpu")
RUNS = 50


def measure(models_dir: Path, accelerator: str) -> dict[str, Any]:
    """In this process: each model loaded on ``accelerator``, its load time, memory and median latency."""
    manager = ModelManager(models_dir, accelerator=accelerator)  # type: ignore[arg-type]
    rng = np.random.default_rng(3)
    figures: dict[str, Any] = {}
    for model_id in manager.servable_ids:
        started = time.perf_counter()
        with manager.lease(model_id) as loaded:
            load_ms = (time.perf_counter() - started) * 1000
            feeds = {info.name: rng.uniform(0, 1, info.shape).astype(info.dtype) for info in loaded.inputs}
            loaded.run(feeds)  # first run: shader compilation on the GPU
            samples = []
            for _ in range(RUNS):
                started = time.perf_counter()
                loaded.run(feeds)
                samples.append((time.perf_counter() - started) * 1000)
            figures[model_id] = {
                "in_use": loaded.accelerator_in_use,
                "load_ms": round(load_ms, 1),
                "median_ms": round(statistics.median(samples), 3),
                "memory_mb": round(loaded.memory_bytes / MB, 1),
            }
    figures["process_rss_mb"] = round(rss_bytes() / MB, 1)
    return figures


def run() -> dict[str, Any]:
    """Both accelerators, each in a fresh process; returns {accelerator: figures}."""
    with tempfile.TemporaryDirectory() as tmp:
        models = copy_bundled_models(Path(tmp) / "models")
        add_face_detector(models)
        results = {}
        for accelerator in ACCELERATORS:
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_accelerators", "--child", str(models), accelerator],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results[accelerator] = json.loads(child.stdout.splitlines()[-1])
    return results


def print_table(results: dict[str, Any]) -> None:
    """One row per model: CPU and GPU median latency, measured model memory, and the process RSS."""
    print(f"{'model':<20} {'cpu ms':>9} {'gpu ms':>9} {'cpu MB':>7} {'gpu MB':>7}  gpu runs on")
    cpu, gpu = results["cpu"], results["gpu"]
    for model_id in (key for key in cpu if key != "process_rss_mb"):
        print(
            f"{model_id:<20} {cpu[model_id]['median_ms']:>9.3f} {gpu[model_id]['median_ms']:>9.3f}"
            f" {cpu[model_id]['memory_mb']:>7.1f} {gpu[model_id]['memory_mb']:>7.1f}  {gpu[model_id]['in_use']}"
        )
    print(f"{'process RSS (MB)':<20} {'':>9} {'':>9} {cpu['process_rss_mb']:>7} {gpu['process_rss_mb']:>7}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure(Path(sys.argv[2]), sys.argv[3])))
    else:
        figures = run()
        print(json.dumps(figures))
        print_table(figures)

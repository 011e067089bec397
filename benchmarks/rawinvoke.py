"""The raw invoke rate of a model: ``threads`` threads, each with its own interpreter, invoking in a loop.

``python -m benchmarks.rawinvoke --model FILE --threads 2 --num-threads 1 --duration 5`` prints JSON.
Each invoke sets the input and reads every output, the minimum an agent must also do per request. The
ceiling the agent is compared against when it serves the same model with as many workers as threads here.
``cpu_us_per_invoke`` (the process's CPU time over the window, per invoke) is the same ceiling in CPU: on a
shared machine it moves far less than the rate, which also counts the time other processes took the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter


def _invoke_loop(
    model: bytes, num_threads: int, start: threading.Barrier, deadline: list[float], counts: list[int], slot: int
) -> None:
    interpreter = Interpreter(model_content=model, num_threads=num_threads)
    interpreter.allocate_tensors()
    inputs = interpreter.get_input_details()
    outputs = interpreter.get_output_details()
    rng = np.random.default_rng(slot)
    feeds = [(detail["index"], rng.uniform(-1, 1, detail["shape"]).astype(detail["dtype"])) for detail in inputs]

    def invoke() -> None:
        for index, value in feeds:
            interpreter.set_tensor(index, value)
        interpreter.invoke()
        for detail in outputs:
            interpreter.get_tensor(detail["index"])

    for _ in range(5):
        invoke()
    start.wait()
    count = 0
    while time.perf_counter() < deadline[0]:
        invoke()
        count += 1
    counts[slot] = count


def measure(model: bytes, threads: int, num_threads: int, duration: float) -> dict[str, Any]:
    """Invokes per second over all threads, measured for ``duration`` seconds after a warm-up."""
    counts = [0] * threads
    deadline = [0.0]
    barrier = threading.Barrier(threads + 1)
    workers = [
        threading.Thread(target=_invoke_loop, args=(model, num_threads, barrier, deadline, counts, slot))
        for slot in range(threads)
    ]
    for worker in workers:
        worker.start()
    deadline[0] = time.perf_counter() + duration + 60  # replaced once every interpreter is ready
    barrier.wait()
    started, cpu_started = time.perf_counter(), time.process_time()
    deadline[0] = started + duration
    for worker in workers:
        worker.join()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    total = sum(counts)
    return {
        "threads": threads,
        "num_threads": num_threads,
        "invokes_per_s": round(total / elapsed, 1),
        "mean_invoke_ms": round(1000 * elapsed * threads / max(1, total), 3),
        "cpu_us_per_invoke": round(1e6 * cpu / max(1, total), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rawinvoke", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=1, help="threads, each with its own interpreter")
    parser.add_argument("--num-threads", type=int, default=1, help="LiteRT threads per interpreter")
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    with open(args.model, "rb") as handle:
        model = handle.read()
    json.dump(measure(model, args.threads, args.num_threads, args.duration), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

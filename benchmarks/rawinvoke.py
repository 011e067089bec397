"""The raw invoke rate of a model: ``threads`` threads, each with its own interpreter, invoking in a loop.

``python -m benchmarks.rawinvoke --model FILE --threads 2 --num-threads 1 --duration 5`` prints JSON.
Each invoke sets the input and reads every output, the minimum an agent must also do per request. The
ceiling the agent is compared against when it serves the same model with as many workers as threads here.
``cpu_us_per_invoke`` (the process's CPU time over the window, per invoke) is the same ceiling in CPU: on a
shared machine it moves far less than the rate, which also counts the time other processes took the CPU.

With ``--picture-b64 FILE --manifest-entry JSON`` each iteration is instead what the agent must do for one
picture request with no transport or serving at all (the no-serving ceiling of the JPEG path): the agent's own
base64 decode and preprocessing (:func:`agent.models.images.image_tensor`, as the entry's ``preprocess`` says),
its own run (:meth:`agent.models.inference.LoadedModel.run`: set the input, invoke, read the outputs) and its own
head (:func:`agent.models.heads.detections`, at the head's defaults). The same loop, timing and CPU counting;
the figures are then per iteration, one picture in, detections out.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from agent.config import Limits
from agent.models.accelerators import load_runtime
from agent.models.catalog import ModelEntry
from agent.models.heads import detections
from agent.models.images import image_tensor
from agent.models.inference import LoadedModel, decode_output
from agent.models.taskspec import DetectionHead


@dataclass(frozen=True)
class Picture:
    """One picture request: the base64 JPEG or PNG and the manifest entry the agent would serve it with."""

    b64: str
    entry: ModelEntry

    def __post_init__(self) -> None:
        # Checked here, before the loop's threads start: one failing in a thread would leave the others waiting.
        if not isinstance(self.entry.head, DetectionHead):
            raise ValueError(f"model {self.entry.id!r}: the manifest entry needs a detection head")
        if not any(spec.preprocess is not None for spec in self.entry.inputs):
            raise ValueError(f"model {self.entry.id!r}: the manifest entry has no input with preprocess")


Step = Callable[[], object]


def _raw_step(model: bytes, num_threads: int, slot: int) -> Step:
    """Set every input (random values), invoke, read every output."""
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

    return invoke


def picture_step(model: bytes, num_threads: int, picture: Picture) -> Step:
    """One picture request without serving: the agent's preprocessing, run and detection head, as
    ``agent.serving.routing`` and ``agent.serving.service`` chain them for an ``infer`` with ``image``."""
    entry = picture.entry
    head = entry.head
    spec = next(spec for spec in entry.inputs if spec.preprocess is not None)
    assert isinstance(head, DetectionHead) and spec.preprocess is not None  # Picture checked both
    preprocess = spec.preprocess
    # One interpreter of its own per thread, as the raw loop has (the agent's pool with one interpreter).
    loaded = LoadedModel(entry, model, num_threads, runtime=load_runtime())
    info = loaded.input_info(spec.name)
    input_hw = (info.shape[1], info.shape[2])
    max_pixels = Limits().max_image_pixels

    def invoke() -> list[dict[str, Any]]:
        tensor, frame = image_tensor(info, preprocess, picture.b64, max_pixels=max_pixels)
        raw = loaded.run({info.name: tensor})
        outputs = [decode_output(output, raw[output.name], raw=False) for output in loaded.outputs]
        return detections(
            head, entry.labels, outputs, frame, input_hw,
            score_threshold=head.score_threshold, max_detections=head.max_detections,
        )

    return invoke


def _invoke_loop(
    make_step: Callable[[], Step], start: threading.Barrier, deadline: list[float], counts: list[int], slot: int
) -> None:
    invoke = make_step()
    for _ in range(5):
        invoke()
    start.wait()
    count = 0
    while time.perf_counter() < deadline[0]:
        invoke()
        count += 1
    counts[slot] = count


def measure(
    model: bytes, threads: int, num_threads: int, duration: float, picture: Picture | None = None
) -> dict[str, Any]:
    """Invokes (with ``picture``: whole picture requests) per second over all threads, measured for
    ``duration`` seconds after a warm-up."""
    counts = [0] * threads
    deadline = [0.0]
    barrier = threading.Barrier(threads + 1)

    def make_step(slot: int) -> Callable[[], Step]:
        if picture is None:
            return lambda: _raw_step(model, num_threads, slot)
        return lambda: picture_step(model, num_threads, picture)

    workers = [
        threading.Thread(target=_invoke_loop, args=(make_step(slot), barrier, deadline, counts, slot))
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
        "path": "raw invoke" if picture is None else "picture->detections, no serving",
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
    parser.add_argument("--picture-b64", metavar="FILE", help="a base64 JPEG or PNG: time whole picture requests")
    parser.add_argument("--manifest-entry", metavar="JSON", help="the model's manifest entry (with --picture-b64)")
    args = parser.parse_args(argv)
    if (args.picture_b64 is None) != (args.manifest_entry is None):
        parser.error("--picture-b64 and --manifest-entry go together")
    with open(args.model, "rb") as handle:
        model = handle.read()
    picture = None
    if args.picture_b64 is not None:
        with open(args.picture_b64, encoding="ascii") as handle:
            b64 = handle.read().strip()
        try:
            picture = Picture(b64, ModelEntry.model_validate_json(args.manifest_entry))
        except ValueError as exc:  # pydantic's ValidationError is one
            parser.error(f"--manifest-entry: {exc}")
    json.dump(measure(model, args.threads, args.num_threads, args.duration, picture), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

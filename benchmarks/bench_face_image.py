"""Scenario 4 alone: the face detector on the full path (signed, cloud broker and outbox), raw tensors against
a 640 x 480 JPEG in with detections out, both at the same number in flight, beside the model's raw invoke
rate and the JPEG path's ceiling with no serving at all (the raw invoke loop doing the agent's own decode,
preprocessing and detection head per iteration); and the bytes on the wire each way. ``make bench`` runs the
same measurements among the others, pinned the same way (the agent and both invoke loops on one CPU, brokers
and load generator on the others).

Run: ``python -m benchmarks.bench_face_image [--duration S] [--runs N] [--no-pin]``; prints a table per run,
then the JSON (a list of runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from benchmarks.placement import NOT_PINNED, Placement, plan_placement
from benchmarks.report import face_bytes_line, face_ceiling_line, face_image_ceiling_ratios, load_table, ratio
from benchmarks.scenarios import Bench, Timings


def run(timings: Timings, placement: Placement = NOT_PINNED) -> dict[str, Any]:
    """Every figure of scenario 4 from one full agent, in a private working directory."""
    bench = Bench(timings, placement)
    try:
        full = bench.start_agent("agent-full", bench.full_settings("agent-full"))
        config = bench.describe_agent(full)
        face = {
            "config": config,
            "agent_full": bench.face(full.device_id),
            "agent_full_image": bench.face_image(full.device_id),
            "raw": bench.raw_face(threads=config["workers"], num_threads=config["num_threads"]),
            "image_no_serving": bench.face_image_ceiling(threads=config["workers"], num_threads=config["num_threads"]),
            "request_bytes": bench.face_request_bytes(),
        }
        face["placement"] = {**placement.describe(), "process_cpus": bench.process_cpus()}
    finally:
        bench.close()
    invokes, invoke_cpu = face["raw"]["invokes_per_s"], face["raw"]["cpu_us_per_invoke"]
    face["ratios"] = {
        "tensors/raw invoke": ratio(face["agent_full"]["req_per_s"], invokes),
        "JPEG->detections/raw invoke": ratio(face["agent_full_image"]["req_per_s"], invokes),
        # The same ratios in CPU (raw CPU per invoke over the agent's CPU per reply): the rate ratio the agent
        # reaches when it keeps its pinned CPU busy and has it alone; steadier when other work shares that CPU.
        "tensors/raw invoke, CPU": ratio(invoke_cpu, face["agent_full"]["server_cpu_us_per_reply"]),
        "JPEG->detections/raw invoke, CPU": ratio(invoke_cpu, face["agent_full_image"]["server_cpu_us_per_reply"]),
        # What any server could reach on this machine: the JPEG path's own work with no transport or serving.
        **face_image_ceiling_ratios(face),
    }
    return face


def print_table(face: dict[str, Any]) -> None:
    print(load_table([("4 face, full, tensors (b64)", face["agent_full"]),
                      ("4 face, full, JPEG in, detections", face["agent_full_image"])]))
    print(face_ceiling_line(face))
    print(face_bytes_line(face))
    for name, value in face["ratios"].items():
        print(f"  {name:<48}{value}")
    print("  (target: JPEG->detections/raw invoke >= 0.5; the no-serving rows bound what any server reaches)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_face_image", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=Timings.duration_s, help="measured seconds per load run")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole scenario this many times (spread)")
    parser.add_argument("--no-pin", action="store_true", help="let every process run on every CPU (no taskset)")
    args = parser.parse_args(argv)
    placement = plan_placement(pin=not args.no_pin)
    if placement.reason_unpinned and not args.no_pin:
        print(f"not pinning: {placement.reason_unpinned}")
    runs = []
    for _ in range(args.runs):
        face = run(Timings(duration_s=args.duration), placement)
        print_table(face)
        runs.append(face)
    print(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

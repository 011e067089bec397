"""Scenario 4 alone: the face detector on the full path (signed, cloud broker and outbox), raw tensors against
a 640 x 480 JPEG in with detections out, both at the same number in flight, beside the model's raw invoke
rate; and the bytes on the wire each way. ``make bench`` runs the same measurements among the others.

Run: ``python -m benchmarks.bench_face_image [--duration S]``; prints a table, then the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from benchmarks.report import face_bytes_line, load_table, ratio
from benchmarks.scenarios import Bench, Timings


def run(timings: Timings) -> dict[str, Any]:
    """Every figure of scenario 4 from one full agent, in a private working directory."""
    bench = Bench(timings)
    try:
        full = bench.start_agent("agent-full", bench.full_settings("agent-full"))
        config = bench.describe_agent(full)
        face = {
            "config": config,
            "agent_full": bench.face(full.device_id),
            "agent_full_image": bench.face_image(full.device_id),
            "raw": bench.raw_face(threads=config["workers"], num_threads=config["num_threads"]),
            "request_bytes": bench.face_request_bytes(),
        }
    finally:
        bench.close()
    invokes = face["raw"]["invokes_per_s"]
    face["ratios"] = {
        "tensors/raw invoke": ratio(face["agent_full"]["req_per_s"], invokes),
        "JPEG->detections/raw invoke": ratio(face["agent_full_image"]["req_per_s"], invokes),
    }
    return face


def print_table(face: dict[str, Any]) -> None:
    print(load_table([("4 face, full, tensors (b64)", face["agent_full"]),
                      ("4 face, full, JPEG in, detections", face["agent_full_image"])]))
    raw = face["raw"]
    print(f"4 face raw invoke: {raw['invokes_per_s']:,.0f} invokes/s with {raw['threads']} threads")
    print(face_bytes_line(face))
    for name, value in face["ratios"].items():
        print(f"  {name:<32}{value}  (target for JPEG->detections: >= 0.5)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_face_image", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=Timings.duration_s, help="measured seconds per load run")
    args = parser.parse_args(argv)
    face = run(Timings(duration_s=args.duration))
    print_table(face)
    print(json.dumps(face))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the agent's time goes per request stage, from py-spy samples of the agent process under load.

``python -m benchmarks.profile --config full --model tiny --inflight 32`` starts a private broker and the
agent (as ``benchmarks.run`` does), drives it from a load generator process, and samples the agent with
``py-spy record --gil`` (only the thread holding the GIL), so each stage's share is its share of the
agent's serial Python time, the resource two workers and the network thread compete for. py-spy is a
profiling tool, not a dependency: ``.venv/bin/pip install py-spy`` first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from benchmarks.harness import load_result, start_load
from benchmarks.scenarios import Bench, Timings

SAMPLE_HZ = 250
DEVICE_ID = "profiled"
# A sample belongs to the first stage any of whose markers appears in its stack (checked in this order).
# Serving stages come before "intake": the network thread serves small requests itself (inside LocalLink._on_message).
# Reply publishing comes before the outbox writer, which publishes replies from its commit callbacks.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("cloud uplink threads (drain, publish)", ("uplink-connection", "uplink-drain")),
    ("publish reply (paho, replay-cache store)", ("Dispatcher._publish", "LocalLink.publish_reply", "Client.publish")),
    ("outbox writer thread (SQLite commits)", ("outbox-writer",)),
    ("upstream copy: envelope + enqueue", ("Upstream.store_reply", "Upstream.enqueue")),
    ("inference (LiteRT set/invoke/get)", ("LoadedModel.run",)),
    ("input decode (b64/list to tensor)", ("prepare_input",)),
    ("picture decode and preprocess (Pillow)", ("image_tensor",)),
    ("task head (detections)", ("detections",)),
    ("outputs to JSON values (tolist)", ("decode_output", "encode_b64_tensor", "run_inference.<locals>.<dictcomp>")),
    ("normalise + JCS + sign", ("sign_reply", "encode_signed_reply")),
    ("reply serialise (json) + binding", ("encode_reply", "encode_unsigned", "encode_message", "encode_record")),
    ("parse + validate request", ("parse_request", "validate_params")),
    ("model lease and routing", ("ModelManager", "Router.")),
    ("metrics and replay cache", ("AgentMetrics", "ReplayCache", "payload_digest")),
    ("PUBACK ordering", ("LocalLink._on_publish", "AckSequencer", "LocalLink._finish")),
    ("service: top labels, timing, counters", ("RequestService", "RequestPipeline.serve")),
    ("intake and admission (network thread)", ("LocalLink._on_message", "Dispatcher.submit", "Admission.")),
    ("queue hop", ("Queue.get", "Queue.put", "Condition.wait", "Condition.notify")),
    ("MQTT network I/O (paho loop)", ("Client.loop_forever", "Client._thread_main", "Client._packet_read")),
]


def classify(frames: list[str]) -> str:
    """The stage of one sampled stack (its first frame names the thread)."""
    for stage, markers in STAGES:
        if any(marker in frame for frame in frames for marker in markers):
            return stage
    return "other"


def stage_breakdown(raw_profile: Path, requests: int, seconds: float) -> dict[str, Any]:
    """Samples per stage from py-spy's collapsed ("raw") output, as shares and microseconds per request."""
    per_stage: Counter[str] = Counter()
    hottest: dict[str, Counter[str]] = defaultdict(Counter)
    total = 0
    for line in raw_profile.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        stage = classify(frames)
        per_stage[stage] += count
        hottest[stage][frames[-1]] += count
        total += count
    sample_s = 1.0 / SAMPLE_HZ
    return {
        "gil_held_fraction": round(total * sample_s / seconds, 3),
        "gil_us_per_request": round(total * sample_s * 1e6 / max(1, requests), 1),
        "stages": {
            stage: {
                "share": round(count / total, 3),
                "us_per_request": round(count * sample_s * 1e6 / max(1, requests), 1),
                "hottest": [frame for frame, _ in hottest[stage].most_common(3)],
            }
            for stage, count in per_stage.most_common()
        },
    }


def profile(
    config: str, model: str, inflight: int, seconds: float, keep_raw: Path | None = None,
    overrides: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    bench = Bench(Timings())
    try:
        configurations = {"full": bench.full_settings, "signed": bench.signed_settings, "bare": bench.bare_settings}
        settings = {**configurations[config](DEVICE_ID), **(overrides or {})}
        agent = bench.start_agent(DEVICE_ID, settings)
        described = bench.describe_agent(agent)
        payload = {"tiny": bench.tiny_payload, "face": bench.face_payload, "face-image": bench.face_image_payload}[model]
        load = start_load(bench.broker, agent.device_id, payload, inflight=inflight, duration=seconds + 2.0, warmup=0.5)
        time.sleep(1.5)
        with tempfile.TemporaryDirectory() as tmp:
            raw_profile = Path(tmp) / "profile.txt"
            subprocess.run(
                [py_spy, "record", "--pid", str(agent.pid), "--duration", str(int(seconds)), "--rate", str(SAMPLE_HZ),
                 "--format", "raw", "--output", str(raw_profile), "--threads", "--gil"],
                check=True, capture_output=True,
            )
            measured = load_result(load)
            requests = int(measured["req_per_s"] * int(seconds))
            breakdown = stage_breakdown(raw_profile, requests, int(seconds))
            if keep_raw is not None:
                shutil.copyfile(raw_profile, keep_raw)
    finally:
        bench.close()
    return {"config": described, "model": model, "inflight": inflight, "load": measured, **breakdown}


def print_breakdown(result: dict[str, Any]) -> None:
    config = result["config"]
    print(
        f"agent {config['signing_backend']}/{config['signing_mode']} signing, cloud {config['cloud'] or 'none'}, "
        f"model {result['model']}, "
        f"{result['inflight']} in flight: {result['load']['req_per_s']:,.0f} req/s, p99 {result['load']['p99_ms']} ms; "
        f"GIL held {result['gil_held_fraction']:.0%} of the time, {result['gil_us_per_request']:,.0f} us per request"
    )
    print(f"  {'stage':<40}{'share':>7}{'us/req':>10}  hottest frame")
    for stage, row in result["stages"].items():
        print(f"  {stage:<40}{row['share']:>7.1%}{row['us_per_request']:>10,.1f}  {row['hottest'][0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", choices=("full", "signed", "bare"), default="full",
        help="full: signing and cloud (outbox); signed: signing only; bare: neither",
    )
    parser.add_argument("--model", choices=("tiny", "face", "face-image"), default="tiny")
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    parser.add_argument("--raw-output", type=Path, help="also keep py-spy's collapsed stacks in this file")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a setting on top of the configuration, as the agent's environment names it (cloud__batch=true)",
    )
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    result = profile(args.config, args.model, args.inflight, args.seconds, args.raw_output, overrides)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_breakdown(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

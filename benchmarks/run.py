"""``make bench``: every scenario in one run, then a table, the JSON, and ``benchmarks/results.json``.

Scenarios (issue 7): 1 ceiling (echo responder), 2 baseline (plain paho + LiteRT), 3 the agent with the
shipped defaults (signed, cloud broker and outbox), signed without cloud, and without either, 4 the face detector
against its raw invoke rate (raw tensors, and a JPEG in with detections out), 5 the concurrency sweep, 6 peak
memory, 7 startup, 8 fairness, and the Pi 4 budget (issue 20: the full path under a cgroup CPU quota of one
Cortex-A72 core for the agent and for its broker). Everything talks QoS 1 over a private mosquitto on loopback;
every process is separate. The responder under test is pinned to one CPU and everything else to the others
(``--no-pin``: not pinned); ``--only budget`` runs the Pi 4 budget scenario alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import (
    bench_accelerators,
    bench_clients,
    bench_deploy,
    bench_ingest,
    bench_models,
    bench_outbox,
    bench_rollout,
    bench_signing,
    bench_swap,
    bench_uplink_bytes,
)
from benchmarks.budget import DEFAULT_CPUS, budget_report, run_budget
from benchmarks.cpu_quota import quota_us
from benchmarks.placement import Placement, plan_placement
from benchmarks.report import format_report, machine, ratios_and_targets
from benchmarks.scenarios import COMPARE_INFLIGHT, SWEEP, Bench, Timings, start_reference_responders

RESULTS_PATH = Path(__file__).resolve().parent / "results.json"
BUDGET_RESULTS_PATH = RESULTS_PATH.with_name("results-budget.json")  # --only budget keeps the full run's file
COMPARED = {
    "ceiling": "ceiling",
    "baseline": "baseline",
    "agent_full": "agent-full",
    "agent_signed": "agent-signed",
    "agent_bare": "agent-bare",
}
SWEPT = {"ceiling": (1,), "baseline": SWEEP, "agent_full": SWEEP, "agent_signed": (), "agent_bare": (1, 128)}
# In-process micro-benchmarks of single components, each with run() -> dict and print_table(dict).
COMPONENT_BENCHES = {
    "signing": bench_signing,
    "outbox": bench_outbox,
    "models": bench_models,
    "uplink_bytes": bench_uplink_bytes,
    "accelerators": bench_accelerators,
    "clients": bench_clients,
    "ingest": bench_ingest,
    "deploy": bench_deploy,
    "rollout": bench_rollout,
    "swap": bench_swap,
}


def run_scenarios(bench: Bench) -> dict[str, Any]:
    """Scenarios 1-8 in the order that keeps the compared processes side by side; returns their results."""
    results: dict[str, Any] = {}
    echo, baseline = start_reference_responders(bench)
    cloud_traffic = bench.cloud_watcher()
    full = bench.start_agent("agent-full", bench.full_settings("agent-full"))
    signed = bench.start_agent("agent-signed", bench.signed_settings("agent-signed"))
    bare = bench.start_agent("agent-bare", bench.bare_settings("agent-bare"))
    memory = {"agent_full": {"idle": full.memory_mb()}, "agent_bare": {"idle": bare.memory_mb()}}
    results["configs"] = {
        "agent_full": bench.describe_agent(full),
        "agent_signed": bench.describe_agent(signed),
        "agent_bare": bench.describe_agent(bare),
    }
    results["placement"] = {**bench.placement.describe(), "process_cpus": bench.process_cpus()}

    compare = bench.interleaved(COMPARED, COMPARE_INFLIGHT)
    results["compare_32"] = compare
    sweeps: dict[str, dict[str, Any]] = {}
    for name, levels in SWEPT.items():
        sweeps[name] = bench.sweep(COMPARED[name], tuple(level for level in levels if level != COMPARE_INFLIGHT))
        sweeps[name][str(COMPARE_INFLIGHT)] = compare[name]
    results["sweeps"] = sweeps
    memory["agent_full"]["after_tiny_load"] = full.memory_mb()
    memory["agent_bare"]["after_tiny_load"] = bare.memory_mb()
    # The echo of a face request (262 KB) is about the size of the detector's reply: the transfer ceiling.
    face_ceiling = bench.face("ceiling")
    echo.stop()
    baseline.stop()
    signed.stop()

    config = results["configs"]["agent_full"]
    results["face"] = {
        "agent_full": bench.face(full.device_id),
        "agent_bare": bench.face(bare.device_id),
        "ceiling": face_ceiling,
        "agent_full_image": bench.face_image(full.device_id),
        "raw": bench.raw_face(threads=config["workers"], num_threads=config["num_threads"]),
        "image_no_serving": bench.face_image_ceiling(threads=config["workers"], num_threads=config["num_threads"]),
        "request_bytes": bench.face_request_bytes(),
    }
    memory["agent_full"]["after_face_load"] = full.memory_mb()
    memory["agent_bare"]["after_face_load"] = bare.memory_mb()
    results["memory"] = memory
    full.stop()
    bare.stop()

    fair = bench.start_agent("agent-fair", bench.full_settings("agent-fair"))
    results["configs"]["agent_fair"] = bench.describe_agent(fair)
    results["fairness"] = bench.fairness(fair.device_id)
    fair.stop()
    results["cloud_messages"] = cloud_traffic.count
    cloud_traffic.close()

    results["placement"]["process_cpus"]["load generator"] = ",".join(map(str, bench.load_generator_cpus or []))
    samples = [results["configs"][name]["startup_s"] for name in ("agent_full", "agent_fair")]
    samples += bench.startups(bench.full_settings("startup"), bench.timings.extra_startups)
    results["startup"] = {
        "config": "agent_full", "samples_s": samples, "median_s": round(statistics.median(samples), 3)
    }
    return results


def budget_cpus(text: str) -> float:
    """``--budget-cpus``: a CPU share the kernel accepts as a quota per 10 ms period."""
    try:
        cpus = float(text)
        quota_us(cpus)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return cpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=Timings.duration_s, help="measured seconds per load run")
    parser.add_argument("--rounds", type=int, default=Timings.rounds, help="interleaved rounds at 32 in flight")
    parser.add_argument("--no-components", action="store_true", help="skip the signing and outbox micro-benchmarks")
    parser.add_argument("--no-pin", action="store_true", help="let every process run on every CPU (no taskset)")
    parser.add_argument(
        "--budget-cpus", type=budget_cpus, default=DEFAULT_CPUS,
        help=f"CPU quota of the agent and of its broker in the Pi 4 budget scenario (default: one Pi 4 core "
        f"on this CPU, {DEFAULT_CPUS}; see BENCHMARKS.md)",
    )
    parser.add_argument("--only", choices=("budget",), help="run only this scenario (no component benchmarks)")
    parser.add_argument(
        "--output", type=Path, help=f"default {RESULTS_PATH} ({BUDGET_RESULTS_PATH} with --only budget)"
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every process is stopped and every cgroup removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine()}
    timings = Timings(duration_s=args.duration, rounds=args.rounds)
    results["timings"] = vars(timings)
    placement = plan_placement(pin=not args.no_pin)
    if placement.reason_unpinned and not args.no_pin:
        print(f"not pinning: {placement.reason_unpinned}")
    if args.only == "budget":
        output = args.output or BUDGET_RESULTS_PATH
        return run_budget_only(results, timings, placement, args.budget_cpus, output, started)
    bench = Bench(timings, placement)
    try:
        results.update(run_scenarios(bench))
    finally:
        bench.close()
    results["budget"] = run_budget(timings, args.budget_cpus, placement)
    results["notes"] = bench.notes
    if results["cloud_messages"] == 0:
        results["notes"].append(
            "no message reached the cloud broker: the agent does not drain an outbox to the cloud yet, "
            "so 'full' measures signing without the outbox"
        )
    if not args.no_components:
        results["components"] = {name: module.run() for name, module in COMPONENT_BENCHES.items()}
    results["ratios"], results["targets"] = ratios_and_targets(results)
    results["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    output = args.output or RESULTS_PATH
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    print()
    print(format_report(results))
    print()
    print(budget_report(results["budget"]))
    for name, component in results.get("components", {}).items():
        print(f"\n{name} micro-benchmark (benchmarks.bench_{name}, in-process, no load generator):")
        COMPONENT_BENCHES[name].print_table(component)
    print(f"\nresults written to {output}")
    return 0


def run_budget_only(
    results: dict[str, Any], timings: Timings, placement: Placement, cpus: float, output: Path, started: float
) -> int:
    """``--only budget``: the Pi 4 budget scenario alone, its JSON written to ``output`` and printed."""
    results["placement"] = placement.describe()
    results["budget"] = run_budget(timings, cpus, placement)
    results["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    print()
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, load average at start {m['load_average_at_start']}, "
          f"at end {m['load_average_at_end']}")
    print(budget_report(results["budget"]))
    print(f"\nresults written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

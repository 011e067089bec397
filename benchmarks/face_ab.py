"""CPU per reply of several agents side by side on one benchmark figure, interleaved round by round.

``python -m benchmarks.face_ab --variant main=. --variant old=/work/wt-old --path old=/tmp/old-deps
--plain-models old --env main-a8=MALLOC_ARENA_MAX=8 --variant main-a8=. -n 6`` starts one agent per variant
with the full settings of ``make bench`` (signing rooted in swtpm, a cloud broker and outbox), all at once
against one private mosquitto, then measures each in turn, the order reversed every other round, on the face
detector with raw tensors (the figure "face, tensors, full") at the benchmark's in-flight count, and with
``--tiny`` also the tiny model at 32 in flight. Printed per variant: the agent's CPU per reply (all its threads,
from ``/proc``) as median, minimum and maximum over the rounds, the same split by thread name, and its peak RSS
(VmHWM) at the end and, with ``--tiny``, after the first tiny run (before any face request). Each agent is
pinned to one CPU and everything else to the others, as ``make bench`` does.
``--plain-models``: that variant is served the models without the ``faces`` entry (older manifests refuse it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO_ROOT, AgentUnderTest
from benchmarks.placement import plan_placement
from benchmarks.scenarios import COMPARE_INFLIGHT, FACE_INFLIGHT, Bench, Timings
from benchmarks.startup_ab import plain_models


def _pairs(values: list[str], option: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        label, sep, rest = value.partition("=")
        if not sep or not label or not rest:
            raise SystemExit(f"{option} {value!r}: expected LABEL=VALUE")
        pairs.append((label, rest))
    return pairs


def start_variants(bench: Bench, args: argparse.Namespace) -> dict[str, AgentUnderTest]:
    """One agent per ``--variant``, full settings, its own data directory; all idle until measured."""
    plain = plain_models(bench) if args.plain_models else None
    paths = _pairs(args.path, "--path")
    envs = _pairs(args.env, "--env")
    agents: dict[str, AgentUnderTest] = {}
    for label, tree_text in _pairs(args.variant, "--variant"):
        tree = Path(tree_text).resolve()
        models = plain if label in args.plain_models else bench.models_dir
        settings = {**bench.full_settings(label), "models_dir": str(models)}
        agent = AgentUnderTest(
            bench.broker, label, settings, bench.workdir / f"{label}.log", bench.placement,
            tree=REPO_ROOT if tree == REPO_ROOT else tree,
        )
        extra = [path for name, path in paths if name == label]
        if tree != REPO_ROOT or extra:
            agent.env["PYTHONPATH"] = os.pathsep.join([str(tree), *extra])
        for name, assignment in envs:
            if name == label:
                key, _, value = assignment.partition("=")
                agent.env[key] = value
        bench.agents.append(agent)
        agent.start()
        bench.server_pids[label] = agent.pid
        agents[label] = agent
    return agents


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds so far of each of a process's threads, by thread id."""
    by_thread: dict[int, float] = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended while being read
            continue
        by_thread[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return by_thread


def thread_names(pid: int) -> dict[int, str]:
    """Python's name of each thread of ``pid`` (from ``py-spy dump``; Python 3.11 leaves the kernel's names
    alone), numbers dropped so that a pool's threads add up; empty without py-spy."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        dump = subprocess.run([py_spy, "dump", "-p", str(pid)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = re.findall(r'^Thread (\d+) \(\w+\): "([^"]*)"', dump, re.MULTILINE)
    return {int(tid): re.sub(r"[-_ ]?\d+$", "", name) for tid, name in found}


def measure(bench: Bench, agents: dict[str, AgentUnderTest], rounds: int, tiny: bool) -> dict[str, dict[str, Any]]:
    """``rounds`` load runs per variant and figure, interleaved; per variant the CPU per reply of each run."""
    # The tiny model first, so that each agent's peak RSS after its first tiny run is the benchmark's figure.
    figures = {"tiny": (bench.tiny_payload, COMPARE_INFLIGHT)} if tiny else {}
    figures["face"] = (bench.face_payload, FACE_INFLIGHT)
    samples: dict[str, dict[str, Any]] = {label: {figure: [] for figure in figures} for label in agents}
    threads: dict[tuple[str, str], list[dict[int, float]]] = {}
    labels = list(agents)
    for index in range(rounds):
        for label in labels if index % 2 == 0 else reversed(labels):
            for figure, (payload, inflight) in figures.items():
                before = thread_cpu_s(agents[label].pid)
                result = bench.load(label, payload, inflight)
                samples[label][figure].append(result["server_cpu_us_per_reply"])
                after, replies = thread_cpu_s(agents[label].pid), max(1, result["replies_total"])
                runs = threads.setdefault((label, figure), [])
                runs.append({tid: 1e6 * (seconds - before.get(tid, 0.0)) / replies for tid, seconds in after.items()})
                if index == 0 and figure == "tiny":
                    samples[label]["memory_after_tiny_mb"] = agents[label].memory_mb()
                print(
                    f"round {index:2d} {label:>14} {figure}: {result['server_cpu_us_per_reply']:8.1f} us/reply,"
                    f" {result['req_per_s']:7.1f} req/s, errors {result['errors']}", flush=True,
                )
    for label, agent in agents.items():
        samples[label]["memory_mb"] = agent.memory_mb()
        names = thread_names(agent.pid)
        for figure in figures:
            by_name: dict[str, list[float]] = {}
            for run in threads[(label, figure)]:
                summed: dict[str, float] = {}
                for tid, us in run.items():
                    name = names.get(tid, "(unnamed)")
                    summed[name] = summed.get(name, 0.0) + us
                for name, us in summed.items():
                    by_name.setdefault(name, []).append(us)
            samples[label][f"{figure}_threads"] = {name: round(statistics.median(us)) for name, us in by_name.items()}
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.face_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="LABEL=TREE (a checkout's root)")
    parser.add_argument("--path", action="append", default=[], help="LABEL=DIR added to that variant's PYTHONPATH")
    parser.add_argument("--env", action="append", default=[], help="LABEL=NAME=VALUE in that variant's environment")
    parser.add_argument("--plain-models", action="append", default=[], metavar="LABEL")
    parser.add_argument("--tiny", action="store_true", help="also the tiny model at 32 in flight")
    parser.add_argument("--no-pin", action="store_true", help="agents not pinned to one CPU (the bench pins)")
    parser.add_argument("-n", "--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=Timings.duration_s)
    args = parser.parse_args(argv)
    bench = Bench(Timings(duration_s=args.duration), plan_placement(pin=not args.no_pin))
    try:
        samples = measure(bench, start_variants(bench, args), args.rounds, args.tiny)
    finally:
        bench.close()
    for label, figures in samples.items():
        for figure, values in figures.items():
            if figure.startswith("memory"):
                continue
            if figure.endswith("_threads"):
                busy = sorted(((us, name) for name, us in values.items() if us >= 20), reverse=True)
                print(f"{label:>14} {figure} (median us/reply): " + ", ".join(f"{name} {us}" for us, name in busy))
                continue
            print(
                f"{label:>14} {figure}: median {statistics.median(values):7.1f} us/reply, min {min(values):7.1f},"
                f" max {max(values):7.1f} ({len(values)} runs)"
            )
        print(f"{label:>14} memory at the end: {figures['memory_mb']}, after the first tiny run:"
              f" {figures.get('memory_after_tiny_mb')}")
    print(json.dumps(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())

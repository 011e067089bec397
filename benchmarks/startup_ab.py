"""Startup to ``online`` of this tree's agent beside another checkout's, alternately, so machine noise cancels.

``python -m benchmarks.startup_ab --other /path/to/old/worktree -n 12`` starts the agent of this tree and the
agent of ``--other`` one after the other, ``n`` times each, with the settings of the benchmark's startup figure
(signing rooted in swtpm, a cloud broker and outbox, the bundled models plus the face detectors) against one
private mosquitto, and prints each one's median, minimum and maximum. ``--other-models plain`` serves the other
tree the models of older benchmarks (no ``faces`` entry with a preprocess and a head, which older manifests
refuse); ``--both-models`` also runs this tree with those, to tell the entry's share from the code's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import REPO_ROOT, AgentUnderTest, process_cpu_s
from benchmarks.scenarios import FACE_IMAGE_MODEL, Bench, Timings


@dataclass
class Variant:
    """One agent configuration measured: a checkout, the models it serves, folders added to its import path."""

    tree: Path
    models_dir: Path
    extra_paths: list[Path] = field(default_factory=list)


def compiled_copy(tree: Path, target: Path) -> Path:
    """A copy of ``tree``'s agent package with its bytecode compiled, as an installed wheel has it (this
    environment may forbid writing bytecode, and a checkout has none): the checkout itself stays untouched."""
    shutil.copytree(tree / "agent", target / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(target / "agent")], check=True)
    return target


def plain_models(bench: Bench) -> Path:
    """A copy of the benchmark's models folder without the ``faces`` entry (pictures in, detections out)."""
    target = bench.workdir / "models-plain"
    shutil.copytree(bench.models_dir, target)
    manifest_path = target / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["models"] = [entry for entry in manifest["models"] if entry["id"] != FACE_IMAGE_MODEL]
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return target


def startup_once(bench: Bench, variant: Variant, name: str) -> tuple[float, float]:
    """One fresh agent of ``variant`` with the full settings (its own data directory): seconds to ``online``,
    and the CPU seconds the agent had used by then (read just after; less disturbed by a busy machine)."""
    settings = {**bench.full_settings(name), "models_dir": str(variant.models_dir)}
    agent = AgentUnderTest(
        bench.broker, name, settings, bench.workdir / f"{name}.log", bench.placement, tree=variant.tree
    )
    if variant.extra_paths:
        agent.env["PYTHONPATH"] = os.pathsep.join(map(str, [variant.tree, *variant.extra_paths]))
    try:
        seconds = agent.start()
        return seconds, process_cpu_s(agent.pid)
    finally:
        agent.stop()


def compare(bench: Bench, variants: dict[str, Variant], rounds: int) -> dict[str, dict[str, list[float]]]:
    """``rounds`` startups of each variant, interleaved (the order reversed every other round): per variant
    the seconds to ``online`` (``wall``) and the agent's CPU seconds by then (``cpu``)."""
    samples: dict[str, dict[str, list[float]]] = {label: {"wall": [], "cpu": []} for label in variants}
    labels = list(variants)
    for index in range(rounds):
        for label in labels if index % 2 == 0 else reversed(labels):
            seconds, cpu = startup_once(bench, variants[label], f"startup-{label}-{index}")
            samples[label]["wall"].append(round(seconds, 3))
            samples[label]["cpu"].append(round(cpu, 3))
            print(f"round {index:2d} {label:>12}: {seconds:.3f} s, cpu {cpu:.2f} s", flush=True)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="another checkout (e.g. a git worktree)")
    parser.add_argument(
        "--other-path", type=Path, action="append", default=[],
        help="a folder added to the other tree's PYTHONPATH (e.g. a dependency this tree no longer has)",
    )
    parser.add_argument("--other-models", choices=("same", "plain"), default="same")
    parser.add_argument("--both-models", action="store_true", help="this tree with the plain models too")
    parser.add_argument(
        "--bytecode", action="store_true",
        help="both trees run from compiled bytecode (as installed wheels do), not compiling their sources",
    )
    parser.add_argument("-n", "--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    bench = Bench(Timings())
    try:
        plain = plain_models(bench)
        other = args.other.resolve()
        this = REPO_ROOT
        if args.bytecode:
            this, other = compiled_copy(this, bench.workdir / "this"), compiled_copy(other, bench.workdir / "other")
        variants = {"this": Variant(this, bench.models_dir)}
        if args.both_models:
            variants["this-plain"] = Variant(this, plain)
        other_models = plain if args.other_models == "plain" else bench.models_dir
        variants["other"] = Variant(other, other_models, args.other_path)
        samples = compare(bench, variants, args.rounds)
    finally:
        bench.close()
    for label, figures in samples.items():
        for figure, values in figures.items():
            print(
                f"{label:>12} {figure:>4}: median {statistics.median(values):.3f} s, min {min(values):.3f},"
                f" max {max(values):.3f}  ({len(values)} starts)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a benchmark run reports: the machine it ran on, the ratios against the targets, and the printed table."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    match = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def _mosquitto_version() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True).stdout
    except OSError:
        return "not installed"
    match = re.search(r"mosquitto version (\S+)", out)
    return match.group(1) if match else "unknown"


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def source_revision() -> dict[str, Any]:
    """The commit measured and any tracked files changed on top of it (read-only git queries)."""
    changed = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": _git("rev-parse", "--short", "HEAD") or "unknown", "uncommitted_changes": changed}


def machine() -> dict[str, Any]:
    """The machine and software versions a run measured, and how busy the machine was when it started."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _lscpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": _mosquitto_version(),
        "ai-edge-litert": _package("ai-edge-litert"),
        "paho-mqtt": _package("paho-mqtt"),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "source": source_revision(),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator to three decimals; None when either is missing or zero."""
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def ratios_and_targets(results: dict[str, Any]) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """The issue's ratios (measured side by side in this run) and each target with met / missed."""
    compare = results["compare_32"]
    face = results["face"]
    fairness = results["fairness"]
    ratios = {
        "agent_full/baseline req/s @32": ratio(compare["agent_full"]["req_per_s"], compare["baseline"]["req_per_s"]),
        "agent_signed/baseline req/s @32": ratio(
            compare["agent_signed"]["req_per_s"], compare["baseline"]["req_per_s"]
        ),
        "agent_bare/baseline req/s @32": ratio(compare["agent_bare"]["req_per_s"], compare["baseline"]["req_per_s"]),
        "agent_full/baseline p99 @32": ratio(compare["agent_full"]["p99_ms"], compare["baseline"]["p99_ms"]),
        "agent_bare/baseline p99 @32": ratio(compare["agent_bare"]["p99_ms"], compare["baseline"]["p99_ms"]),
        "baseline/ceiling req/s @32": ratio(compare["baseline"]["req_per_s"], compare["ceiling"]["req_per_s"]),
        "agent_full/ceiling req/s @32": ratio(compare["agent_full"]["req_per_s"], compare["ceiling"]["req_per_s"]),
        "face agent_full/raw invoke": ratio(face["agent_full"]["req_per_s"], face["raw"]["invokes_per_s"]),
        "face agent_bare/raw invoke": ratio(face["agent_bare"]["req_per_s"], face["raw"]["invokes_per_s"]),
        "face echo ceiling/raw invoke": ratio(face["ceiling"]["req_per_s"], face["raw"]["invokes_per_s"]),
        "face JPEG->detections agent_full/raw invoke": ratio(
            face["agent_full_image"]["req_per_s"], face["raw"]["invokes_per_s"]
        ),
        "face JPEG->detections agent_full/raw invoke, CPU": ratio(
            face["raw"]["cpu_us_per_invoke"], face["agent_full_image"]["server_cpu_us_per_reply"]
        ),
        **face_image_ceiling_ratios(face, prefix="face "),
        "agent_full/baseline server CPU per reply @32": ratio(
            compare["agent_full"]["server_cpu_us_per_reply"], compare["baseline"]["server_cpu_us_per_reply"]
        ),
        "agent_signed/baseline server CPU per reply @32": ratio(
            compare["agent_signed"]["server_cpu_us_per_reply"], compare["baseline"]["server_cpu_us_per_reply"]
        ),
        "agent_bare/baseline server CPU per reply @32": ratio(
            compare["agent_bare"]["server_cpu_us_per_reply"], compare["baseline"]["server_cpu_us_per_reply"]
        ),
        "fairness p99 beside flood/alone": fairness.get("ratio_median", ratio(
            fairness["normal_beside_flood"]["p99_ms"], fairness["normal_alone"]["p99_ms"]
        )),
    }
    memory = results["memory"]["agent_full"]
    startup = results["startup"]["median_s"]
    checks = [
        ("3 full / 2 throughput @32", ratios["agent_full/baseline req/s @32"], ">=", 0.6),
        ("3 full / 2 throughput @32 (stretch)", ratios["agent_full/baseline req/s @32"], ">=", 0.9),
        ("3 full / 2 p99 @32", ratios["agent_full/baseline p99 @32"], "<=", 2.0),
        ("3 no signing, no cloud / 2 throughput @32", ratios["agent_bare/baseline req/s @32"], ">=", 0.9),
        ("4 face, full / raw invoke rate", ratios["face agent_full/raw invoke"], ">=", 0.8),
        ("4 face JPEG in, detections out, full / raw invoke", ratios["face JPEG->detections agent_full/raw invoke"], ">=", 0.5),
        ("peak RSS after load, bundled models (MB)", memory["after_tiny_load"]["VmHWM"], "<", 120.0),
        ("startup to online, median (s)", startup, "<", 1.5),
        ("8 fairness: normal p99 beside flood / alone", ratios["fairness p99 beside flood/alone"], "<=", 2.0),
    ]
    targets = []
    for name, value, op, bound in checks:
        met = None if value is None else {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
        targets.append({"target": name, "value": value, "bound": f"{op} {bound}", "met": met})
    return ratios, targets


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def load_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One line per load measurement: req/s, latency percentiles and errors."""
    header = (
        f"{'scenario':<34}{'inflight':>9}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'errors':>8}"
        f"{'srv CPU us/req':>16}{'ctx sw/req':>11}  notes"
    )
    lines = [header, "-" * len(header)]
    for name, row in rows:
        notes = []
        if row.get("error_reasons"):
            notes.append(", ".join(f"{reason} {count}" for reason, count in row["error_reasons"].items()))
        if row.get("signed_fraction"):
            notes.append(f"signed {row['signed_fraction']:.0%}")
        if row.get("rounds"):
            notes.append(f"median of {row['rounds']}")
        lines.append(
            f"{name:<34}{row['inflight']:>9}{_cell(row['req_per_s'], 0):>10}{_cell(row['p50_ms']):>9}"
            f"{_cell(row['p99_ms']):>9}{_cell(row['p999_ms']):>10}{row['errors']:>8}"
            f"{_cell(row.get('server_cpu_us_per_reply'), 0):>16}"
            f"{_cell(row.get('server_context_switches_per_reply')):>11}"
            f"  {'; '.join(notes)}"
        )
    return "\n".join(lines)


def throughput_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    names = {
        "ceiling": "1 ceiling (echo)",
        "baseline": "2 baseline (paho + LiteRT)",
        "agent_full": "3 agent, full (signed+cloud)",
        "agent_signed": "3 agent, signed, no cloud",
        "agent_bare": "3 agent, no signing/cloud",
    }
    rows = []
    for key, label in names.items():
        for level, row in sorted(results["sweeps"][key].items(), key=lambda item: int(item[0])):
            rows.append((label, row))
    rows.append(("4 face, echo ceiling (262 KB)", results["face"]["ceiling"]))
    rows.append(("4 face, agent full", results["face"]["agent_full"]))
    rows.append(("4 face, agent no signing", results["face"]["agent_bare"]))
    rows.append(("4 face, full, JPEG in, detections", results["face"]["agent_full_image"]))
    fairness = results["fairness"]
    rows.append(("8 normal client alone (paced)", fairness["normal_alone"]))
    rows.append(("8 normal client beside flood", fairness["normal_beside_flood"]))
    rows.append(("8 flooding client", fairness["flooder"]))
    return rows


def format_report(results: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of ``make bench``."""
    m = results["machine"]
    out = [
        f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, mosquitto {m['mosquitto']}, "
        f"ai-edge-litert {m['ai-edge-litert']}, {m['date']}",
        f"load average (1, 5, 15 min) at start {m['load_average_at_start']}, at end {m.get('load_average_at_end')}",
        f"source: commit {m['source']['commit']}, "
        f"uncommitted changes: {', '.join(m['source']['uncommitted_changes']) or 'none'}",
        placement_line(results["placement"]),
        "",
        "configurations measured:",
    ]
    for name, config in results["configs"].items():
        out.append(f"  {name}: " + ", ".join(f"{key}={value}" for key, value in config.items()))
    out += ["", load_table(throughput_rows(results)), ""]
    out.append(face_ceiling_line(results["face"]))
    out.append(face_bytes_line(results["face"]))
    for name, memory in results["memory"].items():
        stages = (f"{stage} {values['VmHWM']} MB peak ({values['VmRSS']} MB now)" for stage, values in memory.items())
        out.append(f"6 memory {name}: " + ", ".join(stages))
    startup = results["startup"]
    out.append(f"7 startup to online: median {startup['median_s']} s, samples {startup['samples_s']}")
    fairness = results["fairness"]
    if fairness.get("ratios"):
        out.append(
            f"8 fairness p99 beside flood / alone over {len(fairness['ratios'])} rounds: median "
            f"{fairness['ratio_median']}, all {fairness['ratios']} (the rows above are the median round)"
        )
    out.append(f"cloud broker messages received while measuring: {results['cloud_messages']}")
    out += ["", "ratios:"]
    out += [f"  {name:<52}{_cell(value, 3):>8}" for name, value in results["ratios"].items()]
    out += ["", "targets:"]
    for target in results["targets"]:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        out.append(f"  {target['target']:<46}{_cell(target['value'], 3):>9}  {target['bound']:<8}{verdict}")
    for note in results["notes"]:
        out.append(f"note: {note}")
    out.append(f"\nwall time {results['wall_time_s']} s")
    return "\n".join(out)


def face_image_ceiling_ratios(face: dict[str, Any], prefix: str = "") -> dict[str, float | None]:
    """The JPEG path's ceiling with no serving at all over the raw invoke (rate, and CPU: raw CPU per invoke
    over CPU per picture), and the agent's CPU per JPEG reply against it (what serving leaves of the ceiling)."""
    raw, ceiling = face["raw"], face["image_no_serving"]
    return {
        f"{prefix}JPEG->detections, no serving/raw invoke": ratio(ceiling["invokes_per_s"], raw["invokes_per_s"]),
        f"{prefix}JPEG->detections, no serving/raw invoke, CPU": ratio(
            raw["cpu_us_per_invoke"], ceiling["cpu_us_per_invoke"]
        ),
        f"{prefix}JPEG->detections agent_full/no serving, CPU": ratio(
            ceiling["cpu_us_per_invoke"], face["agent_full_image"]["server_cpu_us_per_reply"]
        ),
    }


def face_ceiling_line(face: dict[str, Any]) -> str:
    """The raw invoke beside the JPEG path with no serving (same loop, same threads and CPUs)."""
    raw, ceiling = face["raw"], face["image_no_serving"]
    return (
        f"4 face raw invoke: {raw['invokes_per_s']:,.0f} invokes/s, {raw['cpu_us_per_invoke']:,.0f} us CPU each; "
        f"JPEG->detections, no serving: {ceiling['invokes_per_s']:,.0f} pictures/s, "
        f"{ceiling['cpu_us_per_invoke']:,.0f} us CPU each ({raw['threads']} threads x {raw['num_threads']} LiteRT)"
    )


def face_bytes_line(face: dict[str, Any]) -> str:
    """Bytes on the wire per face request and reply: raw tensors (b64) against a JPEG in, detections out."""
    sent, tensor, image = face["request_bytes"], face["agent_full"], face["agent_full_image"]
    return (
        f"4 face bytes per request / reply: tensors {sent['tensor']:,} / {tensor['mean_reply_bytes']:,}, "
        f"JPEG and detections {sent['image']:,} / {image['mean_reply_bytes']:,}"
    )


def placement_line(placement: dict[str, Any]) -> str:
    """Where the processes ran: the pinning plan and each process's CPUs as the kernel reported them."""
    if not placement["pinned"]:
        line = f"not pinned ({placement['reason']})"
    else:
        responder, others = placement["responder_cpus"], placement["other_cpus"]
        line = f"pinned: responder under test on CPU {responder}, the rest on {others}"
    processes = placement.get("process_cpus", {})
    if processes:
        line += "; CPUs per process: " + ", ".join(f"{name} {cpus}" for name, cpus in processes.items())
    return line

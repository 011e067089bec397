"""The Pi 4 budget scenario: the full path (signed, durable cloud copy) on the CPU time of a Raspberry Pi 4.

The agent and its local broker are each confined by a cgroup CPU quota of one Cortex-A72 core
(``benchmarks.cpu_quota``); the load generator and the cloud broker stay outside. Measured: the tiny model
and the face detector (a JPEG in, detections out) at 4 and 32 in flight, against the seed's targets. Where
the cgroup filesystem cannot be written (not root), the scenario is skipped with the reason, never failed.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

from benchmarks.cpu_quota import CpuController, CpuQuota, CpuQuotaUnavailable, pi4_core_cpus
from benchmarks.harness import process_cpu_s
from benchmarks.placement import NOT_PINNED, Placement
from benchmarks.report import load_table
from benchmarks.scenarios import Bench, Timings

BUDGET_INFLIGHT = (4, 32)
DEFAULT_CPUS = pi4_core_cpus()
# The seed's headline for a Pi 4 (issue 20): minimum req/s and, for the face detector, the p99 bound.
TARGETS = {"tiny": {"req_per_s": 500.0}, "face_image": {"req_per_s": 50.0, "p99_ms": 200.0}}
LABELS = {"tiny": "Pi 4 budget, tiny model", "face_image": "Pi 4 budget, face JPEG->detections"}


def verdicts(model: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of ``model`` checked against one load row: value, bound and met (None: no value)."""
    checks = []
    target = TARGETS[model]
    checks.append(("req_per_s", row["req_per_s"], ">=", target["req_per_s"]))
    if "p99_ms" in target:
        checks.append(("p99_ms", row["p99_ms"], "<=", target["p99_ms"]))
    results = []
    for figure, value, op, bound in checks:
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        verdict = {True: "ok", False: "missed", None: "n/a"}[met]
        results.append({"figure": figure, "value": value, "bound": f"{op} {bound:g}", "met": met, "verdict": verdict})
    return results


def run_budget(timings: Timings, cpus: float = DEFAULT_CPUS, placement: Placement = NOT_PINNED) -> dict[str, Any]:
    """The scenario's figures, or ``{"skipped": reason}`` where no cgroup CPU quota can be set here."""
    try:
        return measure_confined(CpuController.find(), timings, cpus, placement)
    except CpuQuotaUnavailable as exc:
        print(f"Pi 4 budget scenario skipped: {exc}")
        return {"skipped": str(exc)}


def measure_confined(
    controller: CpuController, timings: Timings, cpus: float, placement: Placement
) -> dict[str, Any]:
    """Every row of the scenario, the agent and its broker each in a cgroup of ``cpus`` CPUs."""
    prefix = f"edge-agent-bench-{os.getpid()}"
    with ExitStack() as stack:
        broker_quota = stack.enter_context(CpuQuota(controller, f"{prefix}-broker", cpus))
        agent_quota = stack.enter_context(CpuQuota(controller, f"{prefix}-agent", cpus))
        # Entered last, so closed first: every process stops before its cgroup is removed.
        bench = stack.enter_context(closing(Bench(timings, placement)))
        assert bench.broker.pid is not None
        broker_quota.add(bench.broker.pid)
        agent = bench.start_agent("agent-budget", bench.full_settings("agent-budget"))
        agent_quota.add(agent.pid)
        result: dict[str, Any] = {
            "cpus_per_process": cpus,
            "pi4_core_cpus_derived": DEFAULT_CPUS,
            "cgroups": {"agent": agent_quota.describe(), "broker": broker_quota.describe()},
            "config": bench.describe_agent(agent),
            "process_cpus": bench.process_cpus(),
        }
        payloads = {"tiny": bench.tiny_payload, "face_image": bench.face_image_payload}
        rows: dict[str, dict[str, Any]] = {}
        for model, payload in payloads.items():
            for inflight in BUDGET_INFLIGHT:
                rows[f"{model}_{inflight}"] = confined_load(
                    bench, agent.device_id, payload, inflight, agent_quota, broker_quota
                )
        result["rows"] = rows
        result["targets"] = [
            {"row": name, **verdict} for name, row in rows.items() for verdict in verdicts(name.rsplit("_", 1)[0], row)
        ]
        return result


def confined_load(
    bench: Bench, device_id: str, payload: Path, inflight: int, agent_quota: CpuQuota, broker_quota: CpuQuota
) -> dict[str, Any]:
    """One load run (``Bench.load``: the agent's CPU per reply) plus the confined broker's CPU per reply and
    how often each cgroup was throttled."""
    broker_pid = bench.broker.pid
    assert broker_pid is not None
    broker_before = process_cpu_s(broker_pid)
    throttled_before = {"agent": agent_quota.stat(), "broker": broker_quota.stat()}
    row = bench.load(device_id, payload, inflight)
    replies = max(1, row["replies_total"])
    row["broker_cpu_us_per_reply"] = round((process_cpu_s(broker_pid) - broker_before) * 1e6 / replies, 1)
    for name, quota in (("agent", agent_quota), ("broker", broker_quota)):
        after, before = quota.stat(), throttled_before[name]
        periods = after["nr_periods"] - before["nr_periods"]
        throttled = after["nr_throttled"] - before["nr_throttled"]
        row[f"{name}_throttled_periods"] = round(throttled / periods, 3) if periods else None
    return row


def budget_report(budget: dict[str, Any]) -> str:
    """The scenario's table and its targets with ok / MISSED, for the printed report."""
    if "skipped" in budget:
        return f"Pi 4 budget scenario skipped: {budget['skipped']}"
    agent = budget["cgroups"]["agent"]
    out = [
        f"Pi 4 budget: agent and local broker each limited to {budget['cpus_per_process']} CPU "
        f"({agent['quota_us']} us per {agent['period_us']} us, cgroup v{agent['cgroup_version']}); "
        "load generator and cloud broker outside",
        load_table([(LABELS[name.rsplit("_", 1)[0]], row) for name, row in budget["rows"].items()]),
    ]
    for name, row in budget["rows"].items():
        out.append(
            f"  {name:<14} broker CPU {row['broker_cpu_us_per_reply']:,.0f} us/req, throttled periods: "
            f"agent {row['agent_throttled_periods']}, broker {row['broker_throttled_periods']}"
        )
    out.append("Pi 4 budget targets:")
    for target in budget["targets"]:
        verdict = target["verdict"].upper() if target["met"] is False else target["verdict"]
        value = "-" if target["value"] is None else f"{target['value']:,.1f}"
        out.append(f"  {target['row']:<14} {target['figure']:<10}{value:>10}  {target['bound']:<8} {verdict}")
    return "\n".join(out)

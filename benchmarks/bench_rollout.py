"""A fleet rollout (issue 19): a 5 MB bundle to 10 real agents in the default rings (a canary, 10 %, the rest),
through `fleet serve` as its own process: time to complete (and the canary's share), bytes sent per device,
and the chunk service's CPU per MB served.

Everything is real and on one machine: two private mosquittos (device and cloud), ten agent processes with
software keys provisioned by the fleet, the ingest storing their reports in SQLite, the rollout driver in this
process. The chunk service's CPU is its process's user + system time while the rollout ran.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.deploy.staged import ProbationPolicy
from agent.mqtt.transport import new_client
from provisioning.rollout.plan import RolloutPlan
from provisioning.rollout.rollout import Rollout
from tests.fixtures.rollout import RolloutSite, devices, drive, start_fleet, stop_process, wait_until

DEVICES = [f"pi-{i:02d}" for i in range(10)]
BUNDLE_BYTES = 5 * 1024 * 1024


class _ChunkCounter:
    """Counts the chunk bytes the cloud broker carried to each device."""

    def __init__(self, site: RolloutSite) -> None:
        self.bytes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = new_client("bench-chunk-counter")
        self._client.on_connect = lambda c, u, f, r, p: c.subscribe("mcp/files/res/+", qos=0)
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(site.cloud.host, site.cloud.port)
        self._client.loop_start()
        assert self._subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.bytes[message.topic.rsplit("/", 1)[-1]] += len(message.payload)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(directory: Path | None = None) -> dict[str, Any]:
    """Roll a 5 MB bundle out to ten agents; returns the timings, bytes and CPU."""
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-", dir=directory))
    site = RolloutSite(work, serve_in_process=False)
    serve = None
    counter = None
    try:
        site.start_agents(DEVICES)
        log = work / "serve.log"
        serve = start_fleet(site.fleet_command("serve", *site.broker_args(), "--client-id", "bench-serve"), log)
        assert wait_until(lambda: b"fleet serve:" in log.read_bytes(), 30), log.read_text()
        counter = _ChunkCounter(site)
        bundle = site.bundle("2.0.0", padding=BUNDLE_BYTES - 1372)
        plan = RolloutPlan(probation=ProbationPolicy(requests=None, seconds=1.0), device_deadline_s=600)
        cpu_before = _cpu_seconds(serve.pid)
        started = time.time()
        rollout = Rollout.create("bench", bundle.manifest.bundle_id, DEVICES, plan, site.issuer, site.store)
        state = drive(rollout, timeout=600)
        elapsed = time.time() - started
        served_cpu = _cpu_seconds(serve.pid) - cpu_before
        rows = devices("bench")
        canary = next(row for row in rows.values() if row.ring == 0)
        served_mb = sum(counter.bytes.values()) / 1e6
        return {
            "devices": len(DEVICES), "bundle_bytes": bundle.manifest.total_bytes, "state": state,
            "complete_s": elapsed, "canary_s": canary.finished_at - started,
            "bytes_per_device": sum(counter.bytes.values()) / len(DEVICES),
            "max_bytes_per_device": max(counter.bytes.values(), default=0),
            "serve_cpu_s": served_cpu, "serve_cpu_ms_per_mb": served_cpu * 1000 / served_mb if served_mb else None,
        }  # fmt: skip
    finally:
        if counter is not None:
            counter.close()
        stop_process(serve)
        site.close()
        shutil.rmtree(work, ignore_errors=True)


def print_table(results: dict[str, Any]) -> None:
    print(f"fleet rollout of a {results['bundle_bytes'] / 1e6:.1f} MB bundle to {results['devices']} agents "
          f"(rings 1, 10 %, the rest; 1 s probation): {results['state']}")  # fmt: skip
    print(f"  complete in {results['complete_s']:.1f} s (the canary alone {results['canary_s']:.1f} s)")
    print(f"  bytes sent per device {results['bytes_per_device'] / 1e6:.2f} MB (at most "
          f"{results['max_bytes_per_device'] / 1e6:.2f} MB)")  # fmt: skip
    print(f"  chunk service CPU {results['serve_cpu_s']:.2f} s, {results['serve_cpu_ms_per_mb']:.1f} ms per MB served")


if __name__ == "__main__":
    print_table(run(Path(sys.argv[1]) if len(sys.argv) > 1 else None))

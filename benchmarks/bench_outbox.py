"""Durable outbox throughput: group-committed enqueues by thread count, and the drain to a cloud broker.

Run: ``python -m benchmarks.bench_outbox``. Every enqueue is fsynced (``synchronous=FULL``) before it
returns, so the rates depend mostly on the disk's fsync latency, which is measured first and reported. The
drain test fills the outbox while the cloud broker is down, starts the broker, and times from the uplink's
CONNACK until the last PUBACK has been recorded (window of 32 QoS 1 publishes in flight).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import CloudBroker, OutboxSettings
from agent.mqtt.localbroker import MosquittoProcess
from agent.upstream.outbox import Outbox, OutboxItem
from agent.upstream.uplink import Uplink

SECONDS_PER_CONFIG = 1.5
ENQUEUE_THREADS = (1, 4, 16, 64)
DRAIN_MESSAGES = 5000
BODY = json.dumps({"id": 1, "client": "bench", "model": "mobilenet_v2", "top": [[281, 0.93]], "pad": "x" * 200})


def fsync_latency_ms(directory: Path, count: int = 50) -> float:
    """Median latency of a 4 KiB write + fsync in ``directory``: the floor of one durable commit."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    samples = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
            samples.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    return sorted(samples)[len(samples) // 2] * 1000


def enqueue_rate(directory: Path, threads: int) -> dict[str, float]:
    """Durable single-message enqueues per second from ``threads`` threads, and messages per fsync."""
    with Outbox(directory / f"enqueue-{threads}.db") as outbox:
        counts = [0] * threads
        deadline = time.perf_counter() + SECONDS_PER_CONFIG
        body = BODY.encode()

        def worker(index: int) -> None:
            while time.perf_counter() < deadline:
                outbox.enqueue("res", body)
                counts[index] += 1

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        start = time.perf_counter()
        for worker_thread in workers:
            worker_thread.start()
        for worker_thread in workers:
            worker_thread.join()
        elapsed = time.perf_counter() - start
        transactions = outbox.stats().transactions
    return {"msgs_per_s": sum(counts) / elapsed, "msgs_per_commit": sum(counts) / max(1, transactions)}


def enqueue_many_rate(directory: Path, batch: int = 500) -> float:
    """Messages per second stored by one caller in batches of ``batch`` (one transaction each)."""
    items = [OutboxItem(cls="telemetry", body=BODY.encode()) for _ in range(batch)]
    # Room for everything stored in the time allowed, so no eviction work is timed.
    with Outbox(directory / "enqueue-many.db", OutboxSettings(max_messages=10_000_000, max_bytes=2**31)) as outbox:
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < SECONDS_PER_CONFIG:
            outbox.enqueue_many(items)
            count += batch
        return count / (time.perf_counter() - start)


def drain_rate(directory: Path, messages: int = DRAIN_MESSAGES) -> dict[str, float]:
    """Messages per second from the outbox to a cloud broker that comes up after they were stored."""
    broker = MosquittoProcess(directory / "cloud-broker", persistence=False)
    with Outbox(directory / "drain.db") as outbox:
        items = [OutboxItem(cls="res", body=BODY.encode()) for _ in range(messages)]
        for first in range(0, messages, 500):
            outbox.enqueue_many(items[first : first + 500])
        cloud = CloudBroker(host=broker.host, port=broker.port, reconnect_min_s=0.02, reconnect_max_s=0.05)
        uplink = Uplink(outbox, cloud, "bench-device")
        uplink.start()
        try:
            broker.start()
            while uplink.state != "connected":
                time.sleep(0.001)
            commits_before = outbox.stats().transactions
            start = time.perf_counter()
            while outbox.stats().messages:
                time.sleep(0.002)
            elapsed = time.perf_counter() - start
            stats = uplink.stats()
            commits = outbox.stats().transactions - commits_before
        finally:
            uplink.stop()
            broker.close()
    return {"msgs_per_s": messages / elapsed, "window": float(stats.window), "commits": float(commits)}


def run(directory: Path | None = None) -> dict[str, Any]:
    """All outbox figures; ``directory`` should be on the disk the outbox lives on (a temp dir if None)."""
    work = Path(tempfile.mkdtemp(prefix="bench-outbox-", dir=directory))
    try:
        return {
            "fsync_ms": fsync_latency_ms(work),
            "enqueue": {threads: enqueue_rate(work, threads) for threads in ENQUEUE_THREADS},
            "enqueue_many_msgs_per_s": enqueue_many_rate(work),
            "drain": drain_rate(work),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(results: dict[str, Any]) -> None:
    print(f"disk: one 4 KiB write + fsync takes {results['fsync_ms']:.2f} ms (median)")
    print(f"{'durable enqueue':<28}{'msgs/s':>10}{'msgs/fsync':>12}")
    for threads, figures in results["enqueue"].items():
        print(f"  {threads:>3} thread(s){'':<14}{figures['msgs_per_s']:>10.0f}{figures['msgs_per_commit']:>12.1f}")
    print(f"  enqueue_many (500/call){'':<4}{results['enqueue_many_msgs_per_s']:>10.0f}")
    drain = results["drain"]
    print(
        f"drain after reconnect: {drain['msgs_per_s']:.0f} msgs/s with {drain['window']:.0f} in flight "
        f"({drain['commits']:.0f} outbox commits for {DRAIN_MESSAGES} messages)"
    )


if __name__ == "__main__":
    print_table(run())

"""Fleet ingest throughput: records/s with 1, 2 and 4 ``fleet ingest`` worker processes on SQLite and on
PostgreSQL, signature verification included, and CPU per record.

Run: ``python -m benchmarks.bench_ingest``. Each configuration gets a fresh mosquitto and database. The
workers first connect once, so that their sessions (fixed ids, Clean Start off) hold the shared
subscription, and stop; then a backlog of real signed upstream records (inference replies of four devices,
``x5c`` delegated signatures as agents send them by default) is published, and the workers are started
again and drain it. The rate is counted from the first committed record to the last, polled in the
database. CPU per record (from /proc, over that window): the workers' own, and that plus the broker's and
the PostgreSQL server's (SQLite runs inside the workers). Durable settings: SQLite ``synchronous=FULL``, PostgreSQL with
fsync on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peewee

from agent.config import Signing
from agent.mqtt.localbroker import MosquittoProcess
from agent.mqtt.transport import new_client, publish_properties
from agent.signing import ReplyBinding, create_signer, encode_signed_reply
from agent.upstream.uplink_wire import encode_envelope
from provisioning.fleet import Fleet
from provisioning.ingest.devfleet import enrol_software_device
from provisioning.ingest.localpg import PostgresServer, postgres_bin_dir
from provisioning.ingest.schema import Record, open_database

RECORDS = 6000
DEVICES = 4
WORKER_COUNTS = (1, 2, 4)
REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class _Row:
    """An outbox row as the uplink encodes it (``agent.upstream.uplink_wire.ClaimedRecord``)."""

    id: int
    msg_id: str
    cls: str
    body: bytes
    enqueued_wall: float
    age_s: float = 0.01
    remaining_ttl_s: float | None = None


def signed_backlog(work: Path, count: int = RECORDS) -> tuple[Fleet, list[tuple[str, bytes, str]]]:
    """A fleet of ``DEVICES`` software-key devices and ``count`` upstream messages they signed."""
    fleet = Fleet(work / "fleet")
    signers = []
    for index in range(DEVICES):
        device_id = f"bench-{index}"
        key_file = work / device_id / "device-key.pem"
        enrol_software_device(fleet, device_id, key_file)
        signers.append((device_id, create_signer(Signing(backend="software", key_file=key_file), device_id, work)))
    messages = []
    for seq in range(count):
        device_id, signer = signers[seq % DEVICES]
        assert signer is not None
        reply = {"jsonrpc": "2.0", "id": seq, "result": {
            "model": "vibration-anomaly", "model_version": "1.0.0", "served_by": "local",
            "outputs": {"probabilities": [[5.3e-07, 9.7e-05, 0.9999]]},
            "top": [{"label": "bearing_wear", "score": 0.9999}], "timing_ms": {"queue": 0.1, "inference": 0.2},
        }}  # fmt: skip
        request = f'{{"jsonrpc":"2.0","id":{seq},"method":"infer"}}'.encode()
        binding = ReplyBinding(client_id="line-3", request_id=seq, request_sha256=hashlib.sha256(request).hexdigest())
        body = b'{"client_id":"line-3","method":"infer","reply":' + encode_signed_reply(reply, signer, binding) + b"}"
        msg_id = f"{device_id}-{seq:08d}"
        row = _Row(id=seq + 1, msg_id=msg_id, cls="res", body=body, enqueued_wall=time.time())
        messages.append((f"mcp/up/{device_id}/res", encode_envelope(row, device_id), msg_id))
    for _, signer in signers:
        assert signer is not None
        signer.close()
    return fleet, messages


def _publish(broker: MosquittoProcess, messages: list[tuple[str, bytes, str]]) -> None:
    client = new_client("bench-uplink")
    client.max_inflight_messages_set(256)
    client.connect(broker.host, broker.port)
    client.loop_start()
    sent = [client.publish(topic, payload, qos=1, properties=publish_properties(user_properties=[("msg-id", msg_id)]))
            for topic, payload, msg_id in messages]  # fmt: skip
    for info in sent:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


class _Workers:
    """``fleet ingest`` processes with fixed ids ``bench-N`` (their output in ``log_dir``)."""

    def __init__(self, fleet: Fleet, broker: MosquittoProcess, url: str, count: int, log_dir: Path) -> None:
        self.commands = [
            [sys.executable, "-m", "provisioning.fleet", "--dir", str(fleet.root), "ingest", "--host", broker.host,
             "--port", str(broker.port), "--client-id", f"bench-{index}", "--db", url]
            for index in range(count)
        ]  # fmt: skip
        self.logs = [log_dir / f"bench-{index}.log" for index in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        runs = [path.read_bytes().count(b"subscribed to") if path.exists() else 0 for path in self.logs]
        for command, path in zip(self.commands, self.logs):
            with open(path, "ab") as log:
                self.procs.append(subprocess.Popen(command, stdout=log, stderr=log, cwd=REPO, env=env))
        deadline = time.monotonic() + 30
        while any(path.read_bytes().count(b"subscribed to") <= run for path, run in zip(self.logs, runs)):
            if time.monotonic() > deadline or any(proc.poll() is not None for proc in self.procs):
                raise RuntimeError(f"ingest workers did not start: {self.logs[0].read_text()[-2000:]}")
            time.sleep(0.02)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait(60)
        self.procs = []


def cpu_s(pids: list[int]) -> float:
    """User plus system CPU seconds the processes ``pids`` have used (those that exited count nothing)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def drain_rate(
    fleet: Fleet, messages: list[tuple[str, bytes, str]], url: str, workers: int, work: Path,
    server: PostgresServer | None = None,
) -> dict[str, float]:  # fmt: skip
    """Records/s and CPU per record of ``workers`` processes draining ``messages`` into ``url``."""
    database = open_database(url)
    broker = MosquittoProcess(work / f"broker-{workers}-{time.monotonic_ns()}").start()
    try:
        group = _Workers(fleet, broker, url, workers, broker.workdir)
        group.start()  # the sessions now hold the shared subscription
        group.stop()
        _publish(broker, messages)
        group.start()
        while Record.select().count() == 0:
            time.sleep(0.005)
        others = [broker.pid or 0, *(server.process_ids() if server is not None else [])]
        started, workers_before, others_before = time.perf_counter(), cpu_s(group.pids), cpu_s(others)
        first = Record.select().count()
        while (stored := Record.select().count()) < len(messages):
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        cpu = cpu_s(group.pids) - workers_before
        busy = cpu + cpu_s(others) - others_before
        group.stop()
        measured = stored - first
        return {
            "records_per_s": measured / elapsed, "worker_cpu_ms_per_record": 1000 * cpu / measured,
            "total_cpu_ms_per_record": 1000 * busy / measured, "records": float(stored),
        }  # fmt: skip
    finally:
        broker.close()
        database.close()


def run(directory: Path | None = None) -> dict[str, Any]:
    """Every configuration's figures, by database and worker count."""
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=directory))
    results: dict[str, Any] = {"records": RECORDS, "devices": DEVICES, "sqlite": {}, "postgresql": {}}
    try:
        fleet, messages = signed_backlog(work)
        for workers in WORKER_COUNTS:
            url = str(work / f"records-{workers}.db")
            results["sqlite"][workers] = drain_rate(fleet, messages, url, workers, work)
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            results["postgresql"] = {"skipped": "PostgreSQL is not installed"}
            return results
        server = PostgresServer(bin_dir).start()
        try:
            for workers in WORKER_COUNTS:
                url = server.create_database(f"bench{workers}")
                results["postgresql"][workers] = drain_rate(fleet, messages, url, workers, work, server)
        finally:
            server.close()
    except peewee.ImproperlyConfigured as exc:  # no PostgreSQL driver: the fleet extra is not installed
        results["postgresql"] = {"skipped": str(exc)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"{results['records']} signed records (x5c, {results['devices']} devices) drained from the broker:")
    print(f"{'database':<12}{'workers':>8}{'records/s':>11}{'worker CPU ms/rec':>19}{'+ broker, server':>18}")
    for database in ("sqlite", "postgresql"):
        rows = results[database]
        if "skipped" in rows:
            print(f"{database:<12}  skipped: {rows['skipped']}")
            continue
        for workers, figures in rows.items():
            print(
                f"{database:<12}{workers:>8}{figures['records_per_s']:>11.0f}"
                f"{figures['worker_cpu_ms_per_record']:>19.3f}{figures['total_cpu_ms_per_record']:>18.3f}"
            )


if __name__ == "__main__":
    print_table(run())

"""Deployment transfer: a 5 MB bundle over loopback MQTT to the file service (MB/s, chunks/s), and what a
resume costs after kill -9 halfway (re-hashing the journaled chunks, chunks fetched twice).

The device side is the real one (outbox, uplink, journal, transfer); the file service is the tests' minimal one
(``tests/fixtures/file_service.py``), on a private mosquitto.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.config import CloudBroker
from agent.deploy.documents import BundleManifest
from agent.deploy.journal import Journal
from agent.deploy.transfer import Transfer
from agent.mqtt import topics
from agent.mqtt.localbroker import MosquittoProcess
from agent.upstream.outbox import Outbox
from agent.upstream.uplink import Uplink
from tests.fixtures.deploy_bundles import Publisher, build_bundle
from tests.fixtures.file_service import FileService

BUNDLE_BYTES = 5 * 1024 * 1024
CHUNK_SIZES = (131_072, 16_384)


class _Device:
    """The device half, wired as :mod:`agent.deploy.service` wires it."""

    def __init__(self, host: str, port: int, data_dir: Path) -> None:
        self.outbox = Outbox(data_dir / "outbox.db")
        self.uplink = Uplink(self.outbox, CloudBroker(host=host, port=port, reconnect_min_s=0.05), "bench")
        self.journal = Journal(data_dir / "deploy" / "journal.db")
        self.transfer = Transfer(
            self.journal, data_dir / "deploy" / "staging", budget_bytes=64 * 1024 * 1024, chunk_timeout_s=2.0,
            request=lambda body: self.uplink.publish_transient(topics.file_request_topic("bench"), body),
        )  # fmt: skip
        self.uplink.subscribe(topics.file_reply_topic("bench"), self.transfer.on_message)
        self.uplink.start()
        deadline = time.monotonic() + 10
        while self.uplink.state != "connected":
            if time.monotonic() > deadline:
                raise RuntimeError("the bench uplink did not connect")
            time.sleep(0.01)

    def close(self) -> None:
        self.uplink.stop()
        self.outbox.close()
        self.journal.close()


def _transfer_rate(broker: MosquittoProcess, service: FileService, work: Path, chunk_size: int) -> dict[str, float]:
    bundle = build_bundle(Publisher().release, data=os.urandom(BUNDLE_BYTES), chunk_size=chunk_size)
    service.add(bundle)
    device = _Device(broker.host, broker.port, work / f"rate-{chunk_size}")
    try:
        started = time.perf_counter()
        outcome = device.transfer.fetch(bundle.manifest, lambda: None)
        elapsed = time.perf_counter() - started
    finally:
        device.close()
    assert isinstance(outcome, dict)
    chunks = len(bundle.manifest.files[0].chunks)
    return {"chunk_size": chunk_size, "mb_per_s": BUNDLE_BYTES / elapsed / 1e6, "chunks_per_s": chunks / elapsed,
            "seconds": elapsed}  # fmt: skip


def _resume_cost(broker: MosquittoProcess, service: FileService, work: Path) -> dict[str, float]:
    bundle = build_bundle(Publisher().release, data=os.urandom(BUNDLE_BYTES), chunk_size=65_536)
    service.add(bundle)
    data_dir = work / "resume"
    data_dir.mkdir()
    (data_dir / "manifest.json").write_text(bundle.envelope.model_dump_json())
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_deploy", "--killed-halfway", str(data_dir), broker.host, str(broker.port)],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    if child.returncode != -9:
        raise RuntimeError(f"the child was not killed: {child.returncode} {child.stderr.decode()[-500:]}")
    total = len(bundle.manifest.files[0].chunks)
    device = _Device(broker.host, broker.port, data_dir)
    try:
        journaled = len(device.journal.chunks_done(bundle.manifest.bundle_id, bundle.manifest.files[0].name))
        served_before = service.served
        started = time.perf_counter()
        missing = device.transfer.missing_chunks(bundle.manifest)
        check_s = time.perf_counter() - started
        started = time.perf_counter()
        outcome = device.transfer.fetch(bundle.manifest, lambda: None)
        elapsed = time.perf_counter() - started
    finally:
        device.close()
    assert isinstance(outcome, dict)
    fetched_again = service.served - served_before
    return {"chunks": total, "journaled_at_kill": journaled, "missing_after_check": missing,
            "fetched_after_restart": fetched_again, "recheck_ms": check_s * 1000, "resume_s": elapsed}  # fmt: skip


def _killed_halfway(data_dir: Path, host: str, port: int) -> None:
    manifest = BundleManifest.model_validate(json.loads((data_dir / "manifest.json").read_text())["payload"])
    device = _Device(host, port, data_dir)
    name = manifest.files[0].name
    half = len(manifest.files[0].chunks) // 2

    def kill_at_half() -> None:
        if len(device.journal.chunks_done(manifest.bundle_id, name)) >= half:
            os.kill(os.getpid(), 9)

    device.transfer.fetch(manifest, lambda: kill_at_half())


def run(directory: Path | None = None) -> dict[str, Any]:
    """Transfer rates per chunk size and the resume cost after kill -9."""
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-", dir=directory))
    broker = MosquittoProcess(work / "cloud").start()
    service = FileService(broker, "bench-file-service")
    try:
        return {
            "transfer": [_transfer_rate(broker, service, work, size) for size in CHUNK_SIZES],
            "resume": _resume_cost(broker, service, work),
        }
    finally:
        service.close()
        broker.close()
        shutil.rmtree(work, ignore_errors=True)


def print_table(results: dict[str, Any]) -> None:
    print(f"deployment transfer of a {BUNDLE_BYTES // (1024 * 1024)} MiB bundle over loopback MQTT")
    print(f"{'chunk size':<14}{'MB/s':>8}{'chunks/s':>10}{'seconds':>9}")
    for row in results["transfer"]:
        print(f"{row['chunk_size']:<14}{row['mb_per_s']:>8.1f}{row['chunks_per_s']:>10.0f}{row['seconds']:>9.2f}")
    resume = results["resume"]
    print(
        f"resume after kill -9: {resume['journaled_at_kill']}/{resume['chunks']} chunks journaled, "
        f"{resume['missing_after_check']} missing after re-hashing them ({resume['recheck_ms']:.1f} ms), "
        f"{resume['fetched_after_restart']} fetched after the restart in {resume['resume_s']:.2f} s"
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--killed-halfway":
        _killed_halfway(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        print_table(run())

"""Chunked bundle transfer over a real cloud broker to a minimal file service: hashes, resume, outage, space."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import CloudBroker, OutboxSettings
from agent.deploy.journal import Journal
from agent.deploy.transfer import Transfer
from agent.errors import DeployError
from agent.mqtt import topics
from agent.mqtt.localbroker import MosquittoProcess
from agent.upstream.outbox import Outbox
from agent.upstream.uplink import Uplink
from tests.fixtures.deploy_bundles import Publisher, build_bundle
from tests.fixtures.file_service import FileService

PUBLISHER = Publisher()
DATA = os.urandom(300_000)


def wait_until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


class Device:
    """The device half: an uplink on the cloud broker, a journal and a transfer, as the deployer wires them."""

    def __init__(self, broker: MosquittoProcess, data_dir: Path, **transfer_options: object) -> None:
        # Little outbox reserve: the small test filesystem is 8 MiB.
        self.outbox = Outbox(data_dir / "outbox.db", OutboxSettings(reserve_bytes=65_536))
        cloud = CloudBroker(host=broker.host, port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.3)
        self.uplink = Uplink(self.outbox, cloud, "dev1")
        self.journal = Journal(data_dir / "deploy" / "journal.db")
        options = {"budget_bytes": 10 * 1024 * 1024, "chunk_timeout_s": 1.0, **transfer_options}
        self.transfer = Transfer(
            self.journal, data_dir / "deploy" / "staging",
            request=lambda body: self.uplink.publish_transient(topics.file_request_topic("dev1"), body),
            **options,  # type: ignore[arg-type]
        )  # fmt: skip
        self.uplink.subscribe(topics.file_reply_topic("dev1"), self.transfer.on_message)
        self.uplink.start()
        wait_until(lambda: self.uplink.state == "connected")

    def close(self) -> None:
        self.uplink.stop()
        self.outbox.close()
        self.journal.close()


@pytest.fixture
def service(cloud_broker: MosquittoProcess) -> Iterator[FileService]:
    files = FileService(cloud_broker)
    yield files
    files.close()


def test_a_bundle_arrives_whole_and_verified(cloud_broker: MosquittoProcess, service: FileService, tmp_path: Path) -> None:
    bundle = build_bundle(PUBLISHER.release, data=DATA, chunk_size=16_384)
    service.add(bundle)
    device = Device(cloud_broker, tmp_path)
    try:
        paths = device.transfer.fetch(bundle.manifest, lambda: None)
        assert isinstance(paths, dict)
        [path] = paths.values()
        assert path.read_bytes() == DATA
        assert len(device.journal.chunks_done(bundle.manifest.bundle_id, path.name)) == 19
    finally:
        device.close()


def test_a_corrupted_chunk_is_refused_and_fetched_again(
    cloud_broker: MosquittoProcess, service: FileService, tmp_path: Path
) -> None:
    bundle = build_bundle(PUBLISHER.release, data=DATA, chunk_size=65_536)
    service.add(bundle)
    service.corrupt_once = {0, 3}
    device = Device(cloud_broker, tmp_path)
    try:
        paths = device.transfer.fetch(bundle.manifest, lambda: None)
        assert isinstance(paths, dict) and next(iter(paths.values())).read_bytes() == DATA
        assert device.transfer.counts["rejected"] == 2
    finally:
        device.close()


def test_an_interrupted_download_resumes_where_it_stopped_across_a_cloud_outage(
    cloud_broker: MosquittoProcess, service: FileService, tmp_path: Path
) -> None:
    bundle = build_bundle(PUBLISHER.release, data=DATA, chunk_size=8192)
    service.add(bundle)
    device = Device(cloud_broker, tmp_path, window=2)
    name = bundle.manifest.files[0].name
    half = len(bundle.manifest.files[0].chunks) // 2
    outcome = device.transfer.fetch(
        bundle.manifest, lambda: "stop" if len(device.journal.chunks_done(bundle.manifest.bundle_id, name)) >= half else None
    )
    assert outcome == "stop"
    device.close()
    served_before = service.served
    cloud_broker.stop()
    device = Device.__new__(Device)
    cloud_broker.start()
    device.__init__(cloud_broker, tmp_path)  # type: ignore[misc]
    try:
        paths = device.transfer.fetch(bundle.manifest, lambda: None)
        assert isinstance(paths, dict) and paths[name].read_bytes() == DATA
        # Only what was missing was asked for again (plus at most a window's worth in flight at the stop).
        assert service.served - served_before <= len(bundle.manifest.files[0].chunks) - half + 2
    finally:
        device.close()


def test_a_chunk_lost_on_disk_after_it_was_journaled_is_fetched_again(
    cloud_broker: MosquittoProcess, service: FileService, tmp_path: Path
) -> None:
    bundle = build_bundle(PUBLISHER.release, data=DATA, chunk_size=65_536)
    service.add(bundle)
    device = Device(cloud_broker, tmp_path)
    try:
        paths = device.transfer.fetch(bundle.manifest, lambda: None)
        assert isinstance(paths, dict)
        path = next(iter(paths.values()))
        with open(path, "r+b") as handle:
            handle.write(b"\0" * 10)  # as a power cut might leave it
        served = service.served
        again = device.transfer.fetch(bundle.manifest, lambda: None)
        assert isinstance(again, dict) and path.read_bytes() == DATA and service.served == served + 1
    finally:
        device.close()


def test_a_bundle_over_the_staging_budget_is_refused_before_fetching(
    cloud_broker: MosquittoProcess, service: FileService, tmp_path: Path
) -> None:
    bundle = build_bundle(PUBLISHER.release, data=DATA, chunk_size=65_536)
    service.add(bundle)
    device = Device(cloud_broker, tmp_path, budget_bytes=100_000)
    try:
        with pytest.raises(DeployError, match="staging_budget_bytes=100000"):
            device.transfer.fetch(bundle.manifest, lambda: None)
        assert service.requests == 0
    finally:
        device.close()


def test_a_bundle_that_does_not_fit_on_the_disk_is_refused_and_the_outbox_is_untouched(
    cloud_broker: MosquittoProcess, service: FileService, small_filesystem: Path
) -> None:
    from tests.fixtures.disks import fill_disk

    bundle = build_bundle(PUBLISHER.release, data=DATA, chunk_size=65_536)
    service.add(bundle)
    device = Device(cloud_broker, small_filesystem, headroom_bytes=1024 * 1024)
    try:
        device.outbox.enqueue("audit", b'{"kept": true}')
        fill_disk(small_filesystem, leave_bytes=1024 * 1024 + 100_000)
        with pytest.raises(DeployError, match="more bytes of disk"):
            device.transfer.fetch(bundle.manifest, lambda: None)
        assert [e.cls for e in device.outbox.peek()] == ["audit"] and service.requests == 0
    finally:
        device.close()

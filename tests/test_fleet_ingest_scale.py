"""Ingest workers sharing one subscription (MQTT 5 ``$share``) against a real mosquitto and real agents:
every record stored exactly once with two and four workers, and a worker killed with SIGKILL mid-stream,
restarted with its fixed client id, delivers what the broker kept for it (mosquitto 2.0 does not hand a
dead member's messages to the others)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from provisioning.ingest.schema import Record, open_database
from tests.fixtures.ingest import (
    Carried,
    IngestProcess,
    Site,
    Traffic,
    database_url,
    drained,
    eventually,
    infer,
    stored_ids,
)


@pytest.mark.parametrize("kind,count", [("sqlite", 2), ("postgresql", 2), ("sqlite", 4), ("postgresql", 4)])
def test_workers_sharing_the_subscription_store_every_record_exactly_once(
    kind: str, count: int, site: Site, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = database_url(kind, tmp_path, request)
    carried = Carried(site.cloud)
    with site.workers(url, count, buffer=16, batch_max=8) as workers:
        agents = [site.agent("dev1"), site.agent("dev2")]
        for device_id in ("dev1", "dev2"):
            with site.client(device_id) as client:
                infer(client, 120)
        drained(*agents)
        expected = carried.msg_ids()
        assert eventually(lambda: set(stored_ids()) == expected), [worker.stats() for worker in workers]
        stats = [worker.stats() for worker in workers]
    carried.close()
    assert len(stored_ids()) == len(expected) >= 240
    assert sum(s.stored for s in stats) == len(expected) and sum(s.duplicates for s in stats) == 0
    assert all(s.messages > 0 for s in stats), stats  # the broker shared the load
    assert all(s.quarantined == {} for s in stats)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_worker_killed_mid_stream_and_restarted_loses_nothing(
    kind: str, site: Site, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = database_url(kind, tmp_path, request)
    open_database(url)
    site.fleet.init_ca("test fleet")  # the workers read the inventory at start; the device is enrolled later
    carried = Carried(site.cloud)
    workers = [IngestProcess(site.fleet.root, site.cloud, url, f"ingest-{index}").start() for index in range(2)]
    try:
        agent = site.agent("dev1")
        with site.client("dev1") as client:
            traffic = Traffic(client)
            assert eventually(lambda: Record.select().count() >= 50)
            workers[1].kill()
            stored_at_kill = Record.select().count()
            time.sleep(0.5)  # records keep coming; the broker queues the dead worker's share in its session
            workers[1].start()
            assert eventually(lambda: traffic.sent >= stored_at_kill + 100)
            traffic.stop()
        drained(agent)
        expected = carried.msg_ids()
        assert eventually(lambda: set(stored_ids()) == expected), [w.log_path.read_text()[-2000:] for w in workers]
    finally:
        for worker in workers:
            worker.stop()
        carried.close()
    assert len(stored_ids()) == len(expected)
    assert "session present: True" in workers[1].log_path.read_text()  # the restart resumed its session

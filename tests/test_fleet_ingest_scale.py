"""Ingest workers sharing one subscription (MQTT 5 ``$share``) against a real mosquitto and real agents:
every record stored exactly once with two and four workers, and a worker killed with SIGKILL mid-stream,
restarted with its fixed client id, delivers what the broker kept for it (mosquitto 2.0 does not hand a
dead member's messages to the others); a worker killed, or stopped, while the database is down has
acknowledged none of what it held, so nothing is lost."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from provisioning.ingest.localpg import PostgresServer
from provisioning.ingest.schema import Record, open_database
from provisioning.ingest.store import RecordStore
from provisioning.ingest.trust import DeviceKeys
from provisioning.ingest.worker import IngestSettings, IngestWorker
from tests.fixtures.ingest import (
    Carried,
    IngestProcess,
    Site,
    Traffic,
    broker_settings,
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
        # dev1 sends a message per record (many messages to share out), dev2 batches (the default).
        agents = [site.agent("dev1", cloud={"batch": False}), site.agent("dev2")]
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
    assert len(carried.messages()) > 120 and all(s.messages > 0 for s in stats), stats  # the broker shared the load
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


@contextmanager
def _database_outage(kind: str, url: str, request: pytest.FixtureRequest) -> Iterator[None]:
    """The database unusable for the workers: PostgreSQL stopped; SQLite's write lock held by another
    connection (the workers wait for it up to their busy timeout, 30 s)."""
    if kind == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        server.stop()
        try:
            yield
        finally:
            server.start()
        return
    holder = sqlite3.connect(url, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_worker_killed_while_the_database_is_down_loses_nothing(
    kind: str, site: Site, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Acknowledged only after the commit: what a worker received but could not commit is delivered again.
    (On SQLite the worker runs without ``--db``: its default database, FLEET_DIR/records.db.)"""
    site.fleet.init_ca("test fleet")
    url = str(site.fleet.root / "records.db") if kind == "sqlite" else database_url(kind, tmp_path, request)
    database = open_database(url)
    carried = Carried(site.cloud)
    worker = IngestProcess(site.fleet.root, site.cloud, url if kind == "postgresql" else None, "ingest-0").start()
    try:
        agent = site.agent("dev1", cloud={"batch": False})
        with site.client("dev1") as client:
            infer(client, 5)
            assert eventually(lambda: Record.select().count() >= 5)
            database.close()  # the test's own connection, before the server goes
            with _database_outage(kind, url, request):
                infer(client, 30)
                drained(agent)  # the broker took them all and hands them to the worker (Receive Maximum 64)
                if kind == "postgresql":
                    assert eventually(lambda: "cannot commit" in worker.log_path.read_text())
                else:
                    time.sleep(1.0)  # the worker waits for the write lock, holding what it received
                worker.kill()
            worker.start()  # the same client id: its session, with every unacknowledged message
        expected = carried.msg_ids()
        assert eventually(lambda: set(stored_ids()) == expected), worker.log_path.read_text()[-2000:]
    finally:
        worker.stop()
        carried.close()
    assert len(expected) == 35 and Record.select().count() == 35
    assert "session present: True" in worker.log_path.read_text()


def test_a_worker_stopped_while_the_database_is_down_leaves_what_it_holds_to_its_session(
    site: Site, postgres: PostgresServer
) -> None:
    """A stop (SIGTERM) gives up, after its timeout, on a buffer it cannot commit, without acknowledging it:
    the worker started again under its client id receives those messages and stores them."""
    url = postgres.create_database(f"stop{time.monotonic_ns()}")
    database = open_database(url)
    settings = IngestSettings(broker=broker_settings(site.cloud), client_id="ingest-0", buffer=8, batch_max=4)

    def worker() -> IngestWorker:
        return IngestWorker(settings, RecordStore(database, DeviceKeys(site.fleet.root / "inventory.json")))

    carried = Carried(site.cloud)
    first = worker()
    first.start(timeout=10)
    agent = site.agent("dev1", cloud={"batch": False})
    postgres.stop()
    try:
        with site.client("dev1") as client:
            infer(client, 20)
        drained(agent)
        assert eventually(lambda: first.stats().database_retries > 0 and first.stats().received >= 8)
        first.stop(timeout=1.0)
        assert first.stats().stored == 0
    finally:
        postgres.start()
    database.close()  # the connection the server's stop broke
    second = worker()
    second.start(timeout=10)
    try:
        expected = carried.msg_ids()
        assert eventually(lambda: set(stored_ids()) == expected), second.stats()
    finally:
        second.stop()
        carried.close()
    assert len(expected) == 20 and second.stats().stored == 20

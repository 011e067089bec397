"""Staged rollouts end to end: real mosquitto (device and cloud), real agent subprocesses provisioned with the
fleet's release keys, the ingest storing their deploy reports in SQLite, the chunk service, the rollout driver.

The agents are shared by the module (each agent costs a start and ~100 MB on a 2-core machine), so the tests
run in file order, each deploying a higher version: four agents here; ten in the ``slow``
tests/test_fleet_rollout_ten.py and in ``benchmarks/bench_rollout.py``.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peewee
import pytest
from playhouse.db_url import connect

from agent.config import LocalBroker
from agent.deploy.staged import ProbationPolicy
from agent.models.accelerators import load_runtime
from agent.tools.client import DeviceClient
from provisioning.ingest.schema import DeployEvent
from provisioning.rollout.bundles import bundle_model_file
from provisioning.rollout.plan import RolloutPlan
from provisioning.rollout.rollout import Rollout
from provisioning.rollout.schema import IssuedDocument
from provisioning.rollout.status import rollout_status
from tests.fixtures.generated_models import lookup_model
from tests.fixtures.ingest import IngestProcess, postgres  # noqa: F401  (a fixture)
from tests.fixtures.rollout import QUICK_PROBATION, RolloutSite, devices, drive, run_fleet, start_fleet, stop_process
from tests.fixtures.rollout import wait_until

DEVICES = ["dev1", "dev2", "dev3", "dev4"]
# dev4's staging budget (the smallest allowed) cannot hold a padded 200 KB bundle: a device-specific failure.
SMALL_BUDGET = 65_536
CANARY_THEN_REST = RolloutPlan(rings=("1", "100%"), probation=ProbationPolicy(**QUICK_PROBATION), device_deadline_s=60, deadline_s=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutSite]:
    fleet_site = RolloutSite(tmp_path_factory.mktemp("rollout"))
    try:
        fleet_site.start_agents(DEVICES[:3])
        fleet_site.start_agents(DEVICES[3:], staging_budget_bytes=SMALL_BUDGET)
        yield fleet_site
    finally:
        fleet_site.close()


def serving(site: RolloutSite, device_id: str) -> str | None:
    """The version of vibration-anomaly the device last reported active."""
    events = (DeployEvent.select().where((DeployEvent.device_id == device_id) & (DeployEvent.state == "active")
                                         & (DeployEvent.model_id == "vibration-anomaly"))
              .order_by(DeployEvent.seq.desc()))  # fmt: skip
    latest = events.first()
    return None if latest is None else latest.version


def test_canary_first_then_the_rest(site: RolloutSite) -> None:
    site.bundle("2.0.0")
    rollout = Rollout.create("r2", "vibration-anomaly@2.0.0", DEVICES, CANARY_THEN_REST, site.issuer, site.store)
    assert drive(rollout) == "completed"
    rows = devices("r2")
    assert {row.state for row in rows.values()} == {"active"}
    canary = rows["dev1"]
    assert canary.ring == 0 and {rows[d].ring for d in DEVICES[1:]} == {1}
    # The rest were sent their documents only after the canary had finished.
    assert all(rows[d].sent_at > canary.finished_at for d in DEVICES[1:])
    assert all(serving(site, d) == "2.0.0" for d in DEVICES)
    status = rollout_status("r2")
    assert status["counts"] == {"active": 4} and status["failures"] == [] and status["past_deadline"] == []


class Traffic:
    """A client asking ``lookup`` for rows 0..7 on one device, continuously (errors included), until stopped."""

    def __init__(self, site: RolloutSite, device_id: str) -> None:
        self.client = DeviceClient(LocalBroker(host=site.local.host, port=site.local.port), device_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sent = 0
        while not self._stop.is_set():
            self.client.call("infer", {"model": "lookup", "inputs": {"index": [sent % 8]}})
            sent += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()


def test_a_bundle_failing_probation_on_the_canary_aborts_and_nobody_else_receives_it(site: RolloutSite) -> None:
    # A new model whose table lost rows: its reference case (row 1) passes, clients asking for rows 2..7 fail in
    # the interpreter ("gather index out of bounds"), which probation counts against the version.
    source = site.root / "lookup.tflite"
    source.write_bytes(lookup_model([[float(row), -float(row)] for row in range(2)]))
    bundle = bundle_model_file(site.release.signing_key(), source, model_id="lookup", version="2.0.0", task="lookup",
                               labels=[], runtime=load_runtime("auto"), references=[{"inputs": {"index": [1]}}])  # fmt: skip
    site.store.add(bundle)
    plan = CANARY_THEN_REST.model_copy(update={"probation": ProbationPolicy(requests=20, seconds=60.0)})
    traffic = Traffic(site, "dev1")
    try:
        rollout = Rollout.create("r3", "lookup@2.0.0", DEVICES, plan, site.issuer, site.store)
        assert drive(rollout) == "rolled_back"
    finally:
        traffic.stop()
    status = rollout_status("r3")
    assert "canary" in status["reason"]
    assert status["counts"] == {"not_sent": 3, "rolled_back": 1}
    assert "errors: version 2.0.0 failed" in status["failures"][0]["reason"]
    issued = IssuedDocument.select().where(IssuedDocument.deployment_id == "r3")
    assert {doc.device_id for doc in issued} == {"dev1"}  # no other device was sent anything
    assert not DeployEvent.select().where((DeployEvent.deployment_id == "r3") & (DeployEvent.device_id != "dev1")).exists()
    assert all(serving(site, d) == "2.0.0" for d in DEVICES)


def test_crossing_the_failure_threshold_rolls_back_everywhere(site: RolloutSite) -> None:
    site.bundle("4.0.0", padding=200_000)
    plan = CANARY_THEN_REST.model_copy(update={"max_failure_rate": 20.0, "min_finished": 2})
    rollout = Rollout.create("r4", "vibration-anomaly@4.0.0", DEVICES, plan, site.issuer, site.store)
    assert rollout.deployment().rollback_bundle_id == "vibration-anomaly@2.0.0"  # the last completed rollout's
    assert drive(rollout) == "rolled_back"
    status = rollout_status("r4")
    assert status["state"] == "rolled_back" and "finished devices failed" in status["reason"]
    failure = next(f for f in status["failures"] if f["device"] == "dev4")
    assert "staging" in failure["reason"]
    by_device = {row["device"]: row for row in status["devices"]}
    # The canary had activated 4.0.0: it was sent 2.0.0 again with a higher sequence, and serves it.
    assert by_device["dev1"]["rollback"] == "active"
    assert IssuedDocument.get(IssuedDocument.sequence == rows_rollback_sequence("r4", "dev1")).purpose == "rollback"
    for device_id in DEVICES[:3]:
        assert by_device[device_id]["rollback"] in ("active", "cancelled", "none"), by_device[device_id]
        assert serving(site, device_id) == "2.0.0"


def rows_rollback_sequence(deployment_id: str, device_id: str) -> int:
    sequence = devices(deployment_id)[device_id].rollback_sequence
    assert sequence is not None
    return int(sequence)


def test_the_operator_tool_killed_mid_rollout_resumes_on_postgresql(
    site: RolloutSite, postgres: Any, tmp_path: Path
) -> None:
    """The one run on PostgreSQL: `fleet ingest`, a second `fleet serve` instance beside the in-process one (a
    shared subscription), `fleet deploy` killed with SIGKILL after its first ring, then `--resume`d."""
    url = postgres.create_database("rollout")
    database = connect(url)
    site.bundle("5.0.0")
    common = [*site.broker_args(), "--db", url, "--poll", "0.3"]
    ingest = IngestProcess(site.fleet.root, site.cloud, url, "ingest-pg").start()
    serve = start_fleet(site.fleet_command("serve", *site.broker_args(), "--client-id", "serve-2"), tmp_path / "serve.log")
    deploy = start_fleet(site.fleet_command(
        "deploy", "vibration-anomaly@5.0.0", "--id", "r5", "--to", *DEVICES[:3], "--rings", "1,100%",
        "--probation-seconds", "1", "--probation-requests", "0", "--device-deadline", "60", *common,
    ), tmp_path / "deploy.log")  # fmt: skip

    def sent() -> dict[str, float | None]:
        try:
            rows = database.execute_sql("SELECT device_id, sent_at FROM fleet_deployment_devices WHERE deployment_id = 'r5'")
            return dict(rows.fetchall())
        except peewee.DatabaseError:  # the tables are not there yet
            database.rollback()
            return {}

    try:
        assert wait_until(lambda: sent().get("dev1") is not None, 60), (tmp_path / "deploy.log").read_text()
        deploy.send_signal(signal.SIGKILL)
        deploy.wait(10)
        assert sent()["dev2"] is None  # killed before the second ring
        resumed = run_fleet(site.fleet_command("deploy", "--resume", "r5", *common), tmp_path / "resume.log")
        assert resumed.returncode == 0, (resumed.stdout, resumed.stderr)
        assert json.loads(resumed.stdout)["counts"] == {"active": 3}
        # One deploy document per device, none issued twice across the two runs, all published.
        issued = database.execute_sql("SELECT device_id, published FROM fleet_deploy_documents WHERE deployment_id = 'r5'")
        assert sorted(issued.fetchall()) == [(device_id, True) for device_id in DEVICES[:3]]
        shown = run_fleet(site.fleet_command("status", "--db", url), tmp_path / "status.log")
        assert [(r["deployment"], r["state"]) for r in json.loads(shown.stdout)] == [("r5", "completed")]
    finally:
        stop_process(deploy)
        stop_process(serve)
        ingest.stop()
        database.close()


def test_a_device_offline_during_the_rollout_catches_up_when_it_returns(site: RolloutSite) -> None:
    site.bundle("6.0.0")
    site.agents["dev3"].signal(signal.SIGKILL)  # its power is cut
    site.agents["dev3"].wait()
    rollout = Rollout.create("r6", "vibration-anomaly@6.0.0", DEVICES[:3], CANARY_THEN_REST, site.issuer, site.store)
    drive(rollout, until=lambda: devices("r6")["dev2"].state == "active")
    assert devices("r6")["dev3"].state == "sent" and rollout.deployment().state == "running"
    assert rollout_status("r6")["past_deadline"] == []
    site.restart("dev3")
    assert drive(rollout) == "completed"
    assert serving(site, "dev3") == "6.0.0"


def test_a_device_that_never_reports_times_out_as_its_document_says(site: RolloutSite) -> None:
    plan = CANARY_THEN_REST.model_copy(update={"device_deadline_s": 1.0})
    rollout = Rollout.create("r7", "vibration-anomaly@6.0.0", ["ghost-1", "ghost-2"], plan, site.issuer, site.store)
    assert drive(rollout) == "rolled_back"
    status = rollout_status("r7")
    assert status["counts"] == {"not_sent": 1, "timed_out": 1}
    assert status["failures"] == [{"device": "ghost-1", "state": "timed_out", "reason": "no report of an end before the deadline"}]
    document = IssuedDocument.get(IssuedDocument.device_id == "ghost-1")
    assert json.loads(document.payload)["payload"]["deadlines"]["complete_by"] == pytest.approx(
        devices("r7")["ghost-1"].deadline_at
    )


def test_cancel_sends_a_signed_cancel_to_devices_on_their_way(site: RolloutSite, tmp_path: Path) -> None:
    site.bundle("8.0.0")
    plan = CANARY_THEN_REST.model_copy(update={"probation": ProbationPolicy(requests=None, seconds=30.0)})
    rollout = Rollout.create("r8", "vibration-anomaly@8.0.0", ["dev1", "dev2"], plan, site.issuer, site.store)
    drive(rollout, until=lambda: devices("r8")["dev1"].state == "probation")
    cancelled = run_fleet(site.fleet_command("cancel", "r8", *site.broker_args(), "--db", site.database_url),
                          tmp_path / "cancel.log")  # fmt: skip
    assert cancelled.returncode == 0, cancelled.stderr
    assert rollout.step()  # the driver sees the rollout ended
    assert wait_until(lambda: rollout_status("r8")["devices"][0]["rollback"] == "cancelled", 30)
    assert wait_until(lambda: serving(site, "dev1") == "6.0.0", 30)  # probation rolled back
    assert devices("r8")["dev2"].sent_at is None


"""The rollout driver's decisions as a property: any fleet of device outcomes, any rings and abort criteria.

Devices are simulated by their reports (rows in ``fleet_deploy_events``, as the ingest stores them); everything
else is real: a SQLite fleet database, the bundle store, signed documents published retained on a mosquitto.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.mqtt.localbroker import MosquittoProcess
from provisioning.ingest.schema import DeployEvent
from provisioning.rollout.bundles import BundleStore
from provisioning.rollout.issuer import Issuer, RetainedPublisher
from provisioning.rollout.plan import FAILED, FINISHED, RolloutPlan, abort_reason
from provisioning.rollout.release import ReleaseKeys
from provisioning.rollout.rollout import Rollout, rollback_ids
from provisioning.rollout.schema import DeploymentDevice, IssuedDocument, open_rollout_database
from provisioning.rollout.status import rollout_status
from tests.fixtures.rollout import MODEL_FILE, broker_settings

OUTCOMES = ["active", "failed", "rolled_back", "timed_out", "superseded", "refused"]
_COUNTER = itertools.count()


class World:
    """A broker, release keys and two bundles shared by every example; a fresh database per example."""

    def __init__(self, root: Path) -> None:
        from agent.models.accelerators import load_runtime
        from provisioning.rollout.bundles import bundle_model_file

        self.root = root
        self.broker = MosquittoProcess(root / "broker").start()
        self.keys = ReleaseKeys(root / "fleet")
        self.keys.init()
        self.store = BundleStore(root / "bundles")
        for version in ("1.0.0", "2.0.0"):
            self.store.add(bundle_model_file(self.keys.signing_key(), MODEL_FILE, model_id="vibration-anomaly",
                                             version=version, task="vibration-anomaly", labels=[],
                                             runtime=load_runtime("auto")))  # fmt: skip
        self.publisher = RetainedPublisher(broker_settings(self.broker), "decisions")

    def close(self) -> None:
        self.publisher.close()
        self.broker.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    shared = World(tmp_path_factory.mktemp("decisions"))
    yield shared
    shared.close()


def report(device_id: str, document_id: str, state: str) -> None:
    number = next(_COUNTER)
    DeployEvent.create(msg_id=f"m{number}", device_id=device_id, deployment_id=document_id, sequence=None,
                       event="refused" if state == "refused" else "transition",
                       state=None if state == "refused" else state, reason=f"simulated {state}", at=0.0,
                       seq=number, received_at=0.0)  # fmt: skip


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    outcomes=st.lists(st.sampled_from(OUTCOMES), min_size=1, max_size=12),
    rings=st.sampled_from([("1", "100%"), ("1", "10%", "100%"), ("2", "50%")]),
    ramp=st.sampled_from(["rings", "exponential"]),
    max_failure_rate=st.sampled_from([0.0, 20.0, 50.0]),
    min_finished=st.integers(1, 4),
)
def test_rings_abort_and_rollback_hold_for_any_outcomes(
    world: World, outcomes: list[str], rings: tuple[str, ...], ramp: str, max_failure_rate: float, min_finished: int
) -> None:  # fmt: skip
    database = open_rollout_database(str(world.root / f"fleet-{next(_COUNTER)}.db"))
    try:
        issuer = Issuer(database, world.keys.signing_key(), world.publisher)
        plan = RolloutPlan(rings=rings, ramp=ramp, max_failure_rate=max_failure_rate, min_finished=min_finished)  # type: ignore[arg-type]
        devices = [f"d{i}" for i in range(len(outcomes))]
        outcome = dict(zip(devices, outcomes))
        rollout = Rollout.create("r", "vibration-anomaly@2.0.0", devices, plan, issuer, world.store,
                                 rollback_bundle_id="vibration-anomaly@1.0.0")  # fmt: skip
        rollback_id, cancel_id = rollback_ids("r")
        for _ in range(4 * len(devices) + 10):
            before = {row.device_id: row.state for row in DeploymentDevice.select()}
            ended = rollout.step()
            rows = {row.device_id: row for row in DeploymentDevice.select()}
            for row in rows.values():
                # A ring is sent only once every device of the ring before has finished (as this step saw them).
                if row.sent_at is not None and before[row.device_id] == "pending":
                    earlier = [r.state for r in rows.values() if r.ring == row.ring - 1]
                    assert all(state in FINISHED for state in earlier), (row.device_id, earlier)
            if ended:
                break
            for row in rows.values():
                if row.state == "sent":
                    report(row.device_id, "r", outcome[row.device_id])
                if row.rollback == "sent":
                    report(row.device_id, rollback_id if row.state == "active" else cancel_id,
                           "active" if row.state == "active" else "cancelled")  # fmt: skip
        else:
            pytest.fail(f"the rollout did not end: {rollout.deployment().state}")

        deployment = rollout.deployment()
        rows = {row.device_id: row for row in DeploymentDevice.select()}
        states = [(row.ring, row.state) for row in rows.values()]
        sent = [row for row in rows.values() if row.sent_at is not None]
        if deployment.state == "completed":
            assert all(row.state == outcome[row.device_id] for row in rows.values())
            assert abort_reason(plan, states, deployment.ring + 1) is None
        else:
            assert deployment.state == "rolled_back", deployment.reason
            assert any(row.state in FAILED for row in sent)
            for row in rows.values():
                if row.sent_at is None:
                    assert row.state == "not_sent" and row.rollback is None
                elif row.state == "active":
                    assert row.rollback == "active"  # sent the previous bundle, and back on it
                elif row.state in FINISHED:
                    assert row.rollback == "none"
        # One deploy document per device sent, one rollback or cancel per device rolled back, sequences rising.
        issued = list(IssuedDocument.select().order_by(IssuedDocument.issued_at, IssuedDocument.sequence))
        assert [doc.sequence for doc in issued] == sorted({doc.sequence for doc in issued})
        assert sorted(doc.device_id for doc in issued if doc.purpose == "deploy") == sorted(r.device_id for r in sent)
        assert all(doc.published for doc in issued)
    finally:
        database.close()


def test_status_names_a_refusal_that_names_no_deployment(world: World) -> None:
    database = open_rollout_database(str(world.root / "refusal.db"))
    try:
        issuer = Issuer(database, world.keys.signing_key(), world.publisher)
        plan = RolloutPlan(rings=("100%",))
        rollout = Rollout.create("r", "vibration-anomaly@2.0.0", ["d0", "d1"], plan, issuer, world.store)
        rollout.step()
        number = next(_COUNTER)
        DeployEvent.create(msg_id=f"m{number}", device_id="d1", deployment_id=None, event="refused",
                           reason="deployment refused: signed by key 'x', which is not trusted", at=0.0, seq=number,
                           received_at=time.time())  # fmt: skip
        by_device = {row["device"]: row for row in rollout_status("r")["devices"]}
        assert "refused" not in by_device["d0"]
        assert by_device["d1"]["state"] == "sent" and "not trusted" in by_device["d1"]["refused"]
    finally:
        database.close()

"""The issue's ten real agents on one machine (``slow``: ten agent processes, ~25-50 s on 2 cores; the fast
suite runs four in tests/test_fleet_rollout.py): the default rings (a canary, 10 %, the rest), then an
exponential ramp."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.deploy.staged import ProbationPolicy
from provisioning.rollout.plan import RolloutPlan
from provisioning.rollout.rollout import Rollout
from provisioning.rollout.status import rollout_status
from tests.fixtures.rollout import QUICK_PROBATION, RolloutSite, devices, drive

pytestmark = pytest.mark.slow
TEN = [f"pi-{i:02d}" for i in range(10)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutSite]:
    fleet_site = RolloutSite(tmp_path_factory.mktemp("rollout-ten"))
    try:
        fleet_site.start_agents(TEN)
        yield fleet_site
    finally:
        fleet_site.close()


@pytest.mark.parametrize("ramp, sizes", [("rings", [1, 1, 8]), ("exponential", [1, 2, 4, 3])])
def test_ten_agents_in_rings(site: RolloutSite, ramp: str, sizes: list[int]) -> None:
    version = "2.0.0" if ramp == "rings" else "3.0.0"
    site.bundle(version)
    plan = RolloutPlan(ramp=ramp, probation=ProbationPolicy(**QUICK_PROBATION), device_deadline_s=120)  # type: ignore[arg-type]
    rollout = Rollout.create(f"ten-{ramp}", f"vibration-anomaly@{version}", TEN, plan, site.issuer, site.store)
    assert drive(rollout, timeout=240) == "completed"
    rows = devices(f"ten-{ramp}")
    assert [sum(row.ring == ring for row in rows.values()) for ring in range(len(sizes))] == sizes
    for ring in range(1, len(sizes)):
        previous_done = max(row.finished_at for row in rows.values() if row.ring == ring - 1)
        assert all(row.sent_at > previous_done for row in rows.values() if row.ring == ring)
    assert rollout_status(f"ten-{ramp}")["counts"] == {"active": 10}

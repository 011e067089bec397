"""The deployment state machine with a real journal, trust and transfer; the cloud link and the activation are
scripted in-process so that any interleaving of documents, chunks, crashes and restarts can be explored."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.deploy.deployer import Deployer
from agent.deploy.journal import TERMINAL, DeploymentRecord, Journal
from agent.deploy.policy import StepClock
from agent.deploy.staged import PreviousVersion, ProbationVerdict, StagedModel
from agent.deploy.transfer import Transfer
from agent.deploy.trust import Trust, load_public_key
from agent.errors import DeployError
from agent.faults import INTERNAL_ERRORS
from agent.models.catalog import ModelEntry
from agent.upstream.uplink import CloudMessage
from tests.fixtures.deploy_bundles import Bundle, Publisher, build_bundle

PUBLISHER = Publisher()
BUNDLES = {
    "A": build_bundle(PUBLISHER.release, version="2.0.0", data=bytes(range(256)) * 40, chunk_size=1024),
    "B": build_bundle(PUBLISHER.release, version="3.0.0", data=bytes(range(255, -1, -1)) * 30, chunk_size=2048),
    "BAD": build_bundle(PUBLISHER.release, version="9.9.9", data=b"\x01" * 5000, chunk_size=1024),
}
DEVICE_TOPIC = "mcp/deploy/device/dev1"


class Crash(BaseException):
    """kill -9: nothing after it runs (a BaseException, so no guard in the agent catches it)."""


class ScriptedLink:
    """The cloud link and file service in one: answers chunk requests at once, until ``budget`` chunks are
    used up; the next request then crashes the process."""

    def __init__(self) -> None:
        self.budget: int | None = None
        self.transfer: Transfer | None = None
        self.served = 0
        self.after_chunk: Any = None  # called with the count of chunks served so far
        self.silent = False  # requests go unanswered (a file service that is down)

    def request(self, body: bytes) -> bool:
        if self.silent:
            return True
        asked = json.loads(body)
        bundle = next(b for b in BUNDLES.values() if b.manifest.bundle_id == asked["bundle"])
        described = bundle.manifest.file(asked["file"])
        for index in asked["chunks"]:
            if self.budget is not None:
                if self.budget <= 0:
                    raise Crash()
                self.budget -= 1
            data = bundle.files[asked["file"]][index * described.chunk_size : (index + 1) * described.chunk_size]
            assert self.transfer is not None
            self.transfer.on_message(CloudMessage(topic="mcp/files/res/dev1", payload=data, user_properties={
                "bundle": asked["bundle"], "file": asked["file"], "chunk": str(index)}))  # fmt: skip
            self.served += 1
            if self.after_chunk is not None:
                self.after_chunk(self.served)
        return True


class ScriptedActivation:
    """Serves what it is told; the BAD bundle fails its reference check, ``fail_probation`` fails probation."""

    def __init__(self) -> None:
        self.serving: dict[str, str] = {"vibration-anomaly": "1.0.0"}
        self.fail_probation: set[str] = set()
        self.replaced: dict[str, str | None] = {}
        self.discarded: list[str] = []
        self.crash_after: set[str] = set()

    def _maybe_crash(self, step: str) -> None:
        """kill -9 right after ``step`` did its work, before the state machine could journal it."""
        if step in self.crash_after:
            self.crash_after.discard(step)
            raise Crash()

    def warm(self, staged: StagedModel) -> None:
        assert staged.file.read_bytes()  # the staged file is complete and readable
        if staged.version == "9.9.9":
            raise DeployError("reference case 0: probabilities differ by 0.4 (tolerance 0.0001)")
        self._maybe_crash("warm")

    def activate(self, staged: StagedModel) -> PreviousVersion:
        # As the contract asks: repeated after a crash, the same previous version.
        previous = self.replaced.setdefault(staged.deployment_id, self.serving.get(staged.model_id))
        self.serving[staged.model_id] = staged.version
        self._maybe_crash("activate")
        return PreviousVersion(model_id=staged.model_id, entry=None if previous is None else _entry(previous))

    def probation(self, staged: StagedModel, since: float) -> ProbationVerdict:
        if staged.version in self.fail_probation:
            return ProbationVerdict(state="failed", reason="error rate 0.5 above 0.05", requests=4, errors=2)
        return ProbationVerdict(state="passed", requests=50)

    def discard(self, staged: StagedModel) -> None:
        self.discarded.append(staged.version)

    def roll_back(self, previous: PreviousVersion) -> None:
        if previous.entry is None:
            self.serving.pop(previous.model_id, None)
        else:
            self.serving[previous.model_id] = previous.entry.version


def _entry(version: str) -> ModelEntry:
    return ModelEntry.model_validate({**BUNDLES["A"].manifest.entry.model_dump(), "version": version})


class Rig:
    """One device: its data_dir survives restarts; everything else is built again by :meth:`restart`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.link = ScriptedLink()
        self.activation = ScriptedActivation()
        self.reports: list[dict[str, Any]] = []
        self.retained: dict[str, bytes] = {}
        self.window_open = False
        self.wall_offset = 0.0  # how far the device's wall clock is set from the true time
        self.deployer = self._build()

    def _build(self) -> Deployer:
        journal = Journal(self.data_dir / "deploy" / "journal.db")
        trust = Trust([load_public_key(PUBLISHER.release_pem)], None, journal)
        transfer = Transfer(journal, self.data_dir / "deploy" / "staging", budget_bytes=10**8, request=self.link.request,
                            headroom_bytes=0)  # fmt: skip
        self.link.transfer = transfer
        deployer = Deployer(
            device_id="dev1", groups=["line-3"], journal=journal, trust=trust, transfer=transfer,
            activation=self.activation, report=self.reports.append, runtime="litert", agent_version="1.0",
            may_activate=lambda document: document.activation == "immediately" or self.window_open,
            wall=lambda: time.time() + self.wall_offset,
        )  # fmt: skip
        deployer.resume()
        return deployer

    def restart(self) -> None:
        """A new process: the broker delivers the retained documents again once it subscribes."""
        self.deployer.journal.close()
        self.deployer = self._build()
        for topic, raw in self.retained.items():
            self.send(raw, topic, retain=False)

    def send(self, raw: bytes, topic: str = DEVICE_TOPIC, retain: bool = True) -> None:
        if retain:
            self.retained[topic] = raw
        self.deployer.submit("group" if "/group/" in topic else "device", topic, raw)

    def step(self, budget: int | None = None) -> bool:
        """One round; False if it crashed (then restarted)."""
        self.link.budget = budget
        try:
            self.deployer.run_once()
        except Crash:
            self.restart()
            return False
        finally:
            self.link.budget = None
        return True

    def settle(self, rounds: int = 30) -> None:
        self.activation.crash_after.clear()
        for _ in range(rounds):
            self.step()
            if not self.deployer.journal.unfinished():
                return

    def state(self, deployment_id: str) -> str:
        return self.deployer.journal.get(deployment_id).state


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_a_deployment_goes_from_received_to_active_reporting_every_state(rig: Rig) -> None:
    rig.send(PUBLISHER.deployment(BUNDLES["A"], deployment_id="dA"))
    rig.settle()
    assert [t.state for t in rig.deployer.journal.get("dA").history] == [
        "received", "verified", "downloading", "staged", "activating", "probation", "active"]  # fmt: skip
    assert [r["state"] for r in rig.reports] == [t.state for t in rig.deployer.journal.get("dA").history]
    assert rig.activation.serving["vibration-anomaly"] == "2.0.0"
    assert rig.deployer.snapshot == {"active": {"vibration-anomaly": "2.0.0"}, "in_progress": None}
    assert not (rig.data_dir / "deploy" / "staging" / "vibration-anomaly@2.0.0").exists()


def test_the_same_document_twice_does_nothing_twice_and_a_replayed_older_one_is_refused(rig: Rig) -> None:
    older = PUBLISHER.deployment(BUNDLES["B"], deployment_id="dOld")
    newer = PUBLISHER.deployment(BUNDLES["A"], deployment_id="dNew")
    rig.send(newer)
    rig.settle()
    reports = len(rig.reports)
    rig.send(newer)
    rig.restart()
    rig.send(newer)
    rig.settle()
    assert len(rig.reports) == reports
    rig.send(older)
    rig.step()
    assert rig.reports[-1]["event"] == "refused" and "replayed or older document" in rig.reports[-1]["reason"]
    with pytest.raises(DeployError):
        rig.deployer.journal.get("dOld")
    rig.send(PUBLISHER.deployment(BUNDLES["B"], deployment_id="dNew"))  # a newer sequence, an old id
    rig.step()
    assert "was used before" in rig.reports[-1]["reason"] and rig.state("dNew") == "active"


def test_a_newer_document_mid_download_supersedes_and_the_newest_wins(rig: Rig) -> None:
    rig.send(PUBLISHER.deployment(BUNDLES["A"], deployment_id="dA"))
    rig.step()
    rig.step()
    assert rig.state("dA") == "downloading"
    newer = PUBLISHER.deployment(BUNDLES["B"], deployment_id="dB")
    rig.link.after_chunk = lambda served: rig.send(newer) if served == 3 else None
    rig.step()
    assert rig.state("dA") == "superseded" and rig.state("dB") == "received"
    assert not (rig.data_dir / "deploy" / "staging" / "vibration-anomaly@2.0.0").exists()
    rig.settle()
    assert rig.state("dA") == "superseded" and "superseded by dB" in (rig.deployer.journal.get("dA").reason or "")
    assert rig.state("dB") == "active" and rig.activation.serving["vibration-anomaly"] == "3.0.0"


def test_a_signed_cancel_cancels_and_a_zero_length_retained_message_is_ignored(rig: Rig) -> None:
    rig.send(PUBLISHER.deployment(BUNDLES["A"], deployment_id="dA"))
    rig.step()
    rig.send(b"")
    rig.step()
    assert rig.state("dA") == "downloading"
    rig.send(PUBLISHER.deployment(None, action="cancel", deployment_id="dC"))
    rig.settle()
    assert rig.state("dA") == "cancelled" and rig.state("dC") == "cancelled"
    assert rig.activation.serving["vibration-anomaly"] == "1.0.0"


def test_a_bundle_refused_at_warm_fails_and_one_failing_probation_is_rolled_back(rig: Rig) -> None:
    rig.send(PUBLISHER.deployment(BUNDLES["BAD"], deployment_id="dBad"))
    rig.settle()
    assert rig.state("dBad") == "failed" and "refused before activation" in (rig.deployer.journal.get("dBad").reason or "")
    assert list((rig.data_dir / "deploy" / "staging").iterdir()) == []  # nothing left staged
    rig.activation.fail_probation.add("3.0.0")
    rig.send(PUBLISHER.deployment(BUNDLES["B"], deployment_id="dB"))
    rig.settle()
    record = rig.deployer.journal.get("dB")
    assert record.state == "rolled_back" and "error rate" in (record.reason or "")
    assert rig.activation.serving["vibration-anomaly"] == "1.0.0"


def test_a_version_waiting_warmed_for_the_window_is_given_up_when_superseded(rig: Rig) -> None:
    rig.send(PUBLISHER.deployment(BUNDLES["A"], deployment_id="dW", activation="maintenance_window"))
    for _ in range(6):
        rig.step()
    assert rig.state("dW") == "staged" and rig.activation.serving["vibration-anomaly"] == "1.0.0"
    rig.send(PUBLISHER.deployment(BUNDLES["B"], deployment_id="dB"))
    rig.settle()
    assert rig.state("dW") == "superseded" and rig.activation.discarded == ["2.0.0"]
    assert rig.state("dB") == "active" and rig.activation.serving["vibration-anomaly"] == "3.0.0"


def test_the_maintenance_window_opening_lets_a_staged_version_activate(rig: Rig) -> None:
    rig.send(PUBLISHER.deployment(BUNDLES["A"], deployment_id="dW", activation="maintenance_window"))
    for _ in range(6):
        rig.step()
    assert rig.state("dW") == "staged"
    rig.window_open = True
    rig.settle()
    assert rig.state("dW") == "active"


def test_a_download_that_stalls_past_its_step_deadline_times_out(rig: Rig) -> None:
    rig.link.silent = True
    rig.send(PUBLISHER.deployment(BUNDLES["A"], deployment_id="dS", deadlines={"download_s": 0.5}))
    rig.settle()
    record = rig.deployer.journal.get("dS")
    assert record.state == "timed_out" and "step downloading took longer than" in (record.reason or "")


def test_a_wall_clock_set_forward_mid_download_does_not_time_the_step_out(rig: Rig) -> None:
    # An NTP daemon's first sync on a board without a real-time clock: a day forward, after the step began.
    def synchronised(served: int) -> None:
        rig.wall_offset = 86_400.0

    rig.link.after_chunk = synchronised
    rig.send(PUBLISHER.deployment(BUNDLES["A"], deployment_id="dNtp", deadlines={"download_s": 600}))
    rig.settle()
    assert rig.link.served > 1  # the jump came mid-download, with chunks still to fetch
    assert rig.state("dNtp") == "active", rig.deployer.journal.get("dNtp").reason


def test_a_step_resumed_after_a_restart_counts_the_time_before_it(rig: Rig) -> None:
    rig.send(PUBLISHER.deployment(BUNDLES["A"], deployment_id="dLong", deadlines={"download_s": 3600}))
    crashed = [rig.step(budget=1) for _ in range(6)]  # the process dies mid-download
    assert False in crashed
    assert rig.state("dLong") == "downloading"
    rig.wall_offset = 7200.0  # the restarted agent finds the step entered two hours ago
    rig.restart()
    rig.settle()
    record = rig.deployer.journal.get("dLong")
    assert record.state == "timed_out" and "step downloading took longer than 3600 s" in (record.reason or "")


def test_step_time_is_monotonic_within_a_process_and_carried_over_from_the_wall_clock_at_first_sight() -> None:
    monotonic, wall = [100.0], [5_000.0]
    steps = StepClock(lambda: monotonic[0], lambda: wall[0])
    resumed = DeploymentRecord.model_construct(deployment_id="d", state="downloading", entered_at=4_990.0)
    assert steps.elapsed_s(resumed) == 10.0  # entered before this process saw it: wall-clock time carried over
    wall[0] += 86_400.0  # set forward: not time spent in the step
    monotonic[0] += 5.0
    assert steps.elapsed_s(resumed) == 15.0
    moved = DeploymentRecord.model_construct(deployment_id="d", state="staged", entered_at=wall[0] - 30.0)
    steps.entered(moved)  # entered by this process: timed from now, whatever the wall clock says
    monotonic[0] += 2.0
    assert steps.elapsed_s(moved) == 2.0
    other = DeploymentRecord.model_construct(deployment_id="e", state="received", entered_at=wall[0] + 50.0)
    assert steps.elapsed_s(other) == 0.0  # the wall clock set back since: nothing carried over, never negative


def test_deadlines_end_in_timed_out(rig: Rig) -> None:
    rig.send(PUBLISHER.deployment(BUNDLES["A"], deployment_id="dLate", deadlines={"complete_by": time.time() - 1}))
    rig.settle()
    assert rig.state("dLate") == "timed_out" and "deadline" in (rig.deployer.journal.get("dLate").reason or "")


def test_a_group_document_applies_and_another_devices_document_is_refused(rig: Rig) -> None:
    rig.send(PUBLISHER.deployment(BUNDLES["A"], group="line-3", deployment_id="dG"), "mcp/deploy/group/line-3")
    rig.send(PUBLISHER.deployment(BUNDLES["B"], device="dev2", deployment_id="dOther"))
    rig.settle()
    assert rig.state("dG") == "active"
    assert any("for device dev2" in r.get("reason", "") for r in rig.reports if r["event"] == "refused")


def test_a_bug_in_a_step_fails_that_deployment_only_and_the_deployer_thread_goes_on(rig: Rig, monkeypatch) -> None:
    planted, warm = [RuntimeError("planted by the test")], rig.activation.warm
    monkeypatch.setattr(rig.activation, "warm", lambda staged: (planted and _raise(planted.pop())) or warm(staged))
    before = INTERNAL_ERRORS.counts()["deployer"]
    rig.deployer.start()  # the real thread and its guards (run_once, used above, has none)
    try:
        for deployment_id, bundle in (("dA", "A"), ("dB", "B")):
            rig.send(PUBLISHER.deployment(BUNDLES[bundle], deployment_id=deployment_id))
            deadline = time.monotonic() + 30
            while not _finished(rig, deployment_id) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        rig.deployer.stop()
    assert rig.state("dA") == "failed" and "internal error in step" in (rig.deployer.journal.get("dA").reason or "")
    assert rig.state("dB") == "active" and INTERNAL_ERRORS.counts()["deployer"] == before + 1


def _raise(exc: Exception) -> None:
    raise exc


def _finished(rig: Rig, deployment_id: str) -> bool:
    try:
        return rig.state(deployment_id) in TERMINAL
    except DeployError:  # the thread has not taken the document yet
        return False


def test_kill_9_at_every_step_resumes_to_the_same_end(tmp_path: Path) -> None:
    for crash_after in range(12):
        rig = Rig(tmp_path / str(crash_after))
        rig.send(PUBLISHER.deployment(BUNDLES["A"], deployment_id="dA", sequence=1))
        for _ in range(crash_after):
            rig.step(budget=2)
        rig.restart()
        rig.settle()
        assert rig.state("dA") == "active", crash_after
        rig.deployer.journal.close()


class Interleavings(RuleBasedStateMachine):
    """Any interleaving of documents, chunk deliveries, crashes and restarts ends, once the link is left to
    work, in a terminal state consistent with the newest document."""

    @initialize()
    def setup(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.rig = Rig(self.directory)
        self.publisher = Publisher(release=PUBLISHER.release, root=PUBLISHER.root)
        self.newest: tuple[str, str] | None = None  # (deployment id, bundle name or "cancel")
        self.skipped: list[bytes] = []

    @rule(what=st.sampled_from(["A", "B", "BAD", "cancel"]), skip_one=st.booleans())
    def publish(self, what: str, skip_one: bool) -> None:
        if skip_one:  # a document the broker never delivered in time: replayed later, it must be refused
            self.skipped.append(self.publisher.deployment(BUNDLES["A"]))
        raw = (self.publisher.deployment(None, action="cancel") if what == "cancel"
               else self.publisher.deployment(BUNDLES[what]))  # fmt: skip
        self.newest = (json.loads(raw)["payload"]["deployment_id"], what)
        self.rig.send(raw)

    @precondition(lambda self: bool(self.skipped))
    @rule()
    def replay(self) -> None:
        self.rig.send(self.skipped.pop(), retain=False)

    @rule(budget=st.one_of(st.none(), st.integers(0, 6)))
    def step(self, budget: int | None) -> None:
        self.rig.step(budget)

    @rule()
    def restart(self) -> None:
        self.rig.restart()

    @rule(step=st.sampled_from(["warm", "activate"]))
    def crash_inside_activation(self, step: str) -> None:
        """The next warm or swap is killed right after it did its work."""
        self.rig.activation.crash_after.add(step)

    @invariant()
    def at_most_one_unfinished(self) -> None:
        assert len(self.rig.deployer.journal.unfinished()) <= 1

    def teardown(self) -> None:
        try:
            self.rig.settle()
            journal = self.rig.deployer.journal
            assert journal.unfinished() == []
            if self.newest is not None:
                deployment_id, what = self.newest
                expected = {"A": "active", "B": "active", "BAD": "failed", "cancel": "cancelled"}[what]
                assert journal.get(deployment_id).state == expected
                if what in ("A", "B"):
                    assert self.rig.activation.serving["vibration-anomaly"] == BUNDLES[what].manifest.version
            assert all(record.state in TERMINAL for record in journal.recent(100))
            journal.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


Interleavings.TestCase.settings = settings(
    max_examples=20, stateful_step_count=15, deadline=None, suppress_health_check=list(HealthCheck)
)
test_interleavings = Interleavings.TestCase

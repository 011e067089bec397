"""``fleet deploy``: a staged rollout driven from the fleet database, resumable at any point.

Each :meth:`Rollout.step` reads the devices' reports (``fleet_deploy_events``, stored by ``fleet ingest``),
brings every device's row up to date, then decides, in this order: devices past their deadline are
``timed_out``; the abort criteria (:func:`~provisioning.rollout.plan.abort_reason`); all finished:
``completed``; past the rollout's deadline: ``timed_out``; the current ring finished: the next ring's
documents. Every decision is committed before the documents carrying it are published.

Abort rolls back wherever the bundle reached, each device with a document of a higher sequence: a device
that activated it gets the rollback bundle (``{id}.rollback``: ``--rollback-to``, else the bundle of the
last completed rollout of the same model); a device still on its way (downloading, in probation) gets a
signed cancel (``{id}.cancel``), which stops the download or rolls the probation back. A device whose
deployment failed has already returned to its previous version by itself.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
import peewee

from agent.deploy.documents import SEGMENT, BundleManifest
from agent.errors import ProvisioningError
from provisioning.ingest.schema import DeployEvent
from provisioning.rollout.bundles import BundleStore
from provisioning.rollout.issuer import Issuer
from provisioning.rollout.plan import FAILED, FINISHED, SUCCEEDED, RolloutPlan, abort_reason, assign_rings, ring_finished
from provisioning.rollout.schema import RUNNING, TERMINAL_ROLLOUT, Deployment, DeploymentDevice, transaction

log = logging.getLogger(__name__)

OPERATOR_TIMEOUT = "no report of an end before the deadline"
DEPLOYMENT_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,54}"


@dataclass(frozen=True)
class Report:
    """The latest report of one device about one document."""

    state: str
    reason: str | None


def latest_reports(document_ids: list[str]) -> dict[tuple[str, str], Report]:
    """(document id, device) -> the device's latest report on it (by the device's own record order)."""
    latest: dict[tuple[str, str], tuple[int, Report]] = {}
    query = DeployEvent.select().where(DeployEvent.deployment_id.in_(document_ids))
    for event in query:
        key = (event.deployment_id, event.device_id)
        state = "refused" if event.event == "refused" else (event.state or "unknown")
        if key not in latest or event.seq > latest[key][0]:
            latest[key] = (event.seq, Report(state, event.reason))
    return {key: report for key, (_, report) in latest.items()}


def rollback_ids(deployment_id: str) -> tuple[str, str]:
    """The document ids of a rollout's rollback bundle and cancel documents."""
    return f"{deployment_id}.rollback", f"{deployment_id}.cancel"


def refresh_devices(deployment: Deployment, rows: list[DeploymentDevice]) -> list[DeploymentDevice]:
    """``rows`` updated (in memory) from the devices' reports; returns those that changed."""
    rollback_id, cancel_id = rollback_ids(deployment.deployment_id)
    reports = latest_reports([deployment.deployment_id, rollback_id, cancel_id])
    changed = []
    for row in rows:
        before = (row.state, row.reason, row.rollback, row.rollback_reason)
        report = reports.get((deployment.deployment_id, row.device_id))
        if report is not None and row.state not in FINISHED:
            row.state, row.reason = report.state, report.reason
            if row.state in FINISHED:
                row.finished_at = time.time()
        undo = reports.get((rollback_id, row.device_id)) or reports.get((cancel_id, row.device_id))
        if undo is not None and rollback_pending(row):
            row.rollback, row.rollback_reason = undo.state, undo.reason
        if (row.state, row.reason, row.rollback, row.rollback_reason) != before:
            changed.append(row)
    return changed


def rollback_pending(row: DeploymentDevice) -> bool:
    """Whether a rollback or cancel document was sent to the device and has not ended there yet."""
    return row.rollback is not None and row.rollback not in FINISHED and row.rollback not in ("none", "unavailable")


class Rollout:
    """One rollout in the bound fleet database."""

    def __init__(self, deployment_id: str, issuer: Issuer, store: BundleStore) -> None:
        self.deployment_id = deployment_id
        self.issuer = issuer
        self.store = store
        self.database = issuer.database

    @classmethod
    def create(
        cls, deployment_id: str, bundle_id: str, devices: list[str], plan: RolloutPlan, issuer: Issuer,
        store: BundleStore, rollback_bundle_id: str | None = None,
    ) -> Rollout:  # fmt: skip
        """Record a new rollout of ``bundle_id`` to ``devices`` (nothing is sent until :meth:`step`)."""
        if not devices:
            raise ProvisioningError("no devices to deploy to")
        if not re.fullmatch(DEPLOYMENT_ID, deployment_id):
            raise ProvisioningError(f"a rollout id is 1-55 of A-Z a-z 0-9 . _ - (its rollback documents add a "
                                    f"suffix), not {deployment_id!r}")  # fmt: skip
        for device_id in devices:
            if not re.match(SEGMENT, device_id):
                raise ProvisioningError(f"not a device id: {device_id!r}")
        manifest = store.manifest(bundle_id)
        if rollback_bundle_id is None:
            rollback_bundle_id = _last_completed_bundle(manifest)
        elif store.manifest(rollback_bundle_id).model_id != manifest.model_id:
            raise ProvisioningError(f"{rollback_bundle_id} is not a bundle of model {manifest.model_id}")
        now = time.time()
        with transaction(issuer.database):
            if Deployment.get_or_none(Deployment.deployment_id == deployment_id) is not None:
                raise ProvisioningError(f"deployment {deployment_id} exists: `fleet deploy --resume {deployment_id}`")
            Deployment.create(
                deployment_id=deployment_id, bundle_id=bundle_id, rollback_bundle_id=rollback_bundle_id,
                plan=plan.model_dump_json(), state=RUNNING, created_at=now, updated_at=now,
                complete_by=now + plan.deadline_s,
            )  # fmt: skip
            for ring, members in enumerate(assign_rings(list(dict.fromkeys(devices)), plan)):
                for device_id in members:
                    DeploymentDevice.create(deployment_id=deployment_id, device_id=device_id, ring=ring, state="pending")
        return cls(deployment_id, issuer, store)

    def deployment(self, *, lock: bool = False) -> Deployment:
        """The rollout's row; ``lock`` (inside a transaction): locked against other processes until it ends."""
        query = Deployment.select().where(Deployment.deployment_id == self.deployment_id)
        if lock and not isinstance(self.database, peewee.SqliteDatabase):  # SQLite's transaction holds the lock
            query = query.for_update()
        found = query.first()
        if found is None:
            raise ProvisioningError(f"no deployment {self.deployment_id}")
        return found

    def run(self, poll_s: float = 2.0, stop: threading.Event | None = None) -> str:
        """Step until the rollout ends (or ``stop`` is set); returns its state."""
        stop = stop or threading.Event()
        while True:
            try:
                if self.step():
                    break
            except (ProvisioningError, peewee.OperationalError, peewee.InterfaceError) as exc:
                log.error("rollout %s: %s; trying again", self.deployment_id, exc)  # the broker or database is back soon
            if stop.wait(poll_s):
                break
        return self.deployment().state

    def step(self) -> bool:
        """One round of decisions; returns True once the rollout has ended and every document is published."""
        self.issuer.publish_pending(self.deployment_id)
        with transaction(self.database):
            deployment = self.deployment(lock=True)
            rows = list(DeploymentDevice.select().where(DeploymentDevice.deployment_id == self.deployment_id))
            for row in refresh_devices(deployment, rows):
                row.save()
            if deployment.state == RUNNING:
                self._decide(deployment, rows)
            elif deployment.state == "aborted":
                self._watch_rollback(deployment, rows)
            deployment.updated_at = time.time()
            deployment.save()
        self.issuer.publish_pending(self.deployment_id)
        return deployment.state in TERMINAL_ROLLOUT

    def cancel(self, *, roll_back: bool) -> None:
        """Stop the rollout: devices on their way get a cancel; with ``roll_back`` finished ones are rolled back too."""
        with transaction(self.database):
            deployment = self.deployment(lock=True)
            if deployment.state in TERMINAL_ROLLOUT:
                raise ProvisioningError(f"deployment {self.deployment_id} has already ended ({deployment.state})")
            rows = list(DeploymentDevice.select().where(DeploymentDevice.deployment_id == self.deployment_id))
            refresh_devices(deployment, rows)
            if roll_back:
                self._abort(deployment, rows, "cancelled by the operator, rolling back")
            else:
                for row in rows:
                    if row.sent_at is not None and row.state not in FINISHED:
                        self._undo(deployment, row, cancel_only=True)
                deployment.state, deployment.reason = "cancelled", "cancelled by the operator"
            for row in rows:
                row.save()
            deployment.updated_at = time.time()
            deployment.save()
        self.issuer.publish_pending(self.deployment_id)

    # -- decisions ----------------------------------------------------------------------------------

    def _decide(self, deployment: Deployment, rows: list[DeploymentDevice]) -> None:
        plan = RolloutPlan.model_validate_json(deployment.plan)
        now = time.time()
        for row in rows:
            if row.sent_at is not None and row.state not in FINISHED and now > row.deadline_at:
                row.state, row.reason, row.finished_at = "timed_out", OPERATOR_TIMEOUT, now
                row.save()
        states = [(row.ring, row.state) for row in rows]
        reason = abort_reason(plan, states, deployment.ring + 1)
        if reason is not None:
            self._abort(deployment, rows, reason)
        elif all(row.state in FINISHED for row in rows):
            deployment.state = "completed"
            deployment.reason = f"{sum(row.state in SUCCEEDED for row in rows)} of {len(rows)} devices active"
        elif now > deployment.complete_by:
            deployment.state, deployment.reason = "timed_out", "the rollout's deadline passed"
            log.warning("rollout %s: timed out", self.deployment_id)
        elif ring_finished(states, deployment.ring) and deployment.ring + 1 <= max(row.ring for row in rows):
            deployment.ring += 1
            self._send_ring(deployment, plan, [row for row in rows if row.ring == deployment.ring], now)

    def _send_ring(self, deployment: Deployment, plan: RolloutPlan, members: list[DeploymentDevice], now: float) -> None:
        bundle = self.store.envelope(deployment.bundle_id)
        log.info("rollout %s: ring %d, %d devices", self.deployment_id, deployment.ring, len(members))
        for row in members:
            deadline = min(now + plan.device_deadline_s, deployment.complete_by)
            document = self.issuer.issue(self.deployment_id, row.device_id, "deploy", self.deployment_id, {
                "action": "deploy", "bundle": bundle.model_dump(mode="json"), "activation": plan.activation,
                "probation": plan.probation.model_dump(mode="json"), "deadlines": {"complete_by": deadline},
                "expires": deadline,
            })  # fmt: skip
            row.state, row.sequence, row.sent_at, row.deadline_at = "sent", document.sequence, now, deadline
            row.save()

    def _abort(self, deployment: Deployment, rows: list[DeploymentDevice], reason: str) -> None:
        log.warning("rollout %s: aborted: %s", self.deployment_id, reason)
        deployment.state, deployment.reason = "aborted", reason
        for row in rows:
            if row.sent_at is None:
                row.state, row.reason = "not_sent", "the rollout was aborted before this device's ring"
            elif row.state in FAILED or row.state in ("cancelled", "superseded"):
                row.rollback, row.rollback_reason = "none", "the deployment did not stay on this device"
            else:
                self._undo(deployment, row, cancel_only=False)
            row.save()
        if not any(rollback_pending(row) for row in rows):
            deployment.state = "rolled_back"

    def _undo(self, deployment: Deployment, row: DeploymentDevice, *, cancel_only: bool) -> None:
        plan = RolloutPlan.model_validate_json(deployment.plan)
        rollback_id, cancel_id = rollback_ids(self.deployment_id)
        expires = time.time() + max(plan.deadline_s, plan.device_deadline_s)
        if row.state in SUCCEEDED and not cancel_only:
            if deployment.rollback_bundle_id is None:
                row.rollback = "unavailable"
                row.rollback_reason = "no earlier bundle of this model is known: give --rollback-to"
                return
            bundle = self.store.envelope(deployment.rollback_bundle_id)
            document = self.issuer.issue(self.deployment_id, row.device_id, "rollback", rollback_id, {
                "action": "deploy", "bundle": bundle.model_dump(mode="json"),
                "probation": {"requests": None, "seconds": 1.0}, "expires": expires,
                "deadlines": {"complete_by": time.time() + plan.device_deadline_s},
            })  # fmt: skip
        else:
            document = self.issuer.issue(self.deployment_id, row.device_id, "cancel", cancel_id,
                                         {"action": "cancel", "expires": expires})  # fmt: skip
        row.rollback, row.rollback_reason, row.rollback_sequence = "sent", None, document.sequence
        row.rollback_deadline_at = time.time() + plan.device_deadline_s

    def _watch_rollback(self, deployment: Deployment, rows: list[DeploymentDevice]) -> None:
        now = time.time()
        for row in rows:
            if rollback_pending(row) and now > row.rollback_deadline_at:
                row.rollback, row.rollback_reason = "timed_out", OPERATOR_TIMEOUT
                row.save()
        if not any(rollback_pending(row) for row in rows):
            deployment.state = "rolled_back"


def _last_completed_bundle(manifest: BundleManifest) -> str | None:
    """The bundle of the newest completed rollout of the same model (another version), if any."""
    for deployment in Deployment.select().where(Deployment.state == "completed").order_by(Deployment.created_at.desc()):
        model_id = deployment.bundle_id.partition("@")[0]
        if model_id == manifest.model_id and deployment.bundle_id != manifest.bundle_id:
            return str(deployment.bundle_id)
    return None


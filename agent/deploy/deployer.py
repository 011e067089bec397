"""The deployment state machine: one thread that takes signed documents, journals, fetches, activates, watches.

States (each entered by a journal commit *before* the step runs, each with a reason)::

    received -> verified -> downloading -> staged -> activating -> probation -> active
    and the ends: failed, rolled_back, superseded, cancelled, timed_out

Newest wins. Documents arrive retained on the device's topic and its groups' (docs/deploy.md); one whose
``sequence`` is above every sequence accepted before supersedes the deployment in progress at whatever
step (a download stops between chunks, its progress kept for a later bundle that shares it). A ``cancel``
document cancels it (rolling back if it was in probation). Older or equal sequences are refused as replays,
except the very documents already journaled, which are ignored (brokers deliver retained messages again
on every connection). A zero-length retained message is ignored and logged: it only clears the broker.

Every transition is reported upstream as a signed ``deploy`` record through the outbox after its commit;
at start the state of every unfinished deployment is reported again, so a crash between the two loses
nothing. Steps and deployments have deadlines (``deadlines`` in the document) ending in ``timed_out``;
any unexpected error in a step ends the deployment ``failed``: never a stuck state.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.deploy.documents import BundleManifest, DeploymentDocument
from agent.deploy.journal import DeploymentRecord, Journal, State
from agent.deploy.policy import StepClock, check_requirements, check_target, overdue
from agent.deploy.staged import Activation, PreviousVersion, StagedModel
from agent.deploy.transfer import Transfer
from agent.deploy.trust import Trust
from agent.errors import DeployError
from agent.faults import INTERNAL_ERRORS

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]
_POLL_S = 0.5
_INCOMING_MAX = 64


class Deployer:
    """Drives deployments for ``device_id``; ``submit`` is fed by the cloud subscriptions."""

    def __init__(
        self,
        *,
        device_id: str,
        groups: list[str],
        journal: Journal,
        trust: Trust,
        transfer: Transfer,
        activation: Activation,
        report: Report,
        runtime: str,
        agent_version: str,
        may_activate: Callable[[DeploymentDocument], bool] = lambda document: True,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self._groups = groups
        self.journal = journal
        self._trust = trust
        self._transfer = transfer
        self._activation = activation
        self._report = report
        self._runtime = runtime
        self._agent_version = agent_version
        self._may_activate = may_activate
        self._wall = wall  # only for the signed documents' times (complete_by) and the reports' "at"
        self._clock = clock
        self._steps = StepClock(clock, wall)
        self._incoming: queue.Queue[tuple[str, str, bytes]] = queue.Queue(_INCOMING_MAX)
        self._seen: dict[str, str] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._probation_since: dict[str, float] = {}
        self._warmed: set[str] = set()
        self.snapshot: dict[str, Any] = {"active": {}, "in_progress": None}

    # -- public API ---------------------------------------------------------------------------------

    def submit(self, kind: str, topic: str, payload: bytes) -> None:
        """A retained document from ``topic`` (``kind``: device, group or keys); never blocks the caller."""
        try:
            self._incoming.put_nowait((kind, topic, payload))
        except queue.Full:
            log.error("deploy: too many documents waiting; dropped one from %s (the broker retains it)", topic)
        self._transfer.wake()

    def start(self) -> None:
        self._refresh_snapshot()
        self._thread = threading.Thread(target=self._run, name="deployer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._transfer.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run_once(self) -> None:
        """Take what documents are waiting and advance the current deployment by one step (tests use it)."""
        self._take_documents()
        current = self._current()
        if current is not None:
            self._advance(current)
        self._refresh_snapshot()

    def resume(self) -> None:
        """At start: report every unfinished deployment's state again; older leftovers are superseded."""
        unfinished = self.journal.unfinished()
        for stale in unfinished[:-1]:
            self._move(stale, "superseded", f"superseded by deployment {unfinished[-1].deployment_id} (found at start)")
        if unfinished:
            self._send(unfinished[-1])
            log.info("deploy: resuming %s in state %s", unfinished[-1].deployment_id, unfinished[-1].state)

    # -- the thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        with INTERNAL_ERRORS.guard("deployer"):
            self.resume()
        progressed = False
        while not self._stopping.is_set():
            with INTERNAL_ERRORS.guard("deployer"):
                # Waits only while nothing moved (a window, a probation, no deployment): steps follow at once.
                self._take_documents(wait_s=0.0 if progressed else _POLL_S)
                current = self._current()
                progressed = False
                if current is not None and not self._stopping.is_set():
                    self._advance_guarded(current)
                    after = self.journal.get(current.deployment_id)
                    progressed = (after.state, after.entered_at) != (current.state, current.entered_at)
                self._refresh_snapshot()

    def _current(self) -> DeploymentRecord | None:
        unfinished = self.journal.unfinished()
        return unfinished[-1] if unfinished else None

    def _advance_guarded(self, record: DeploymentRecord) -> None:
        try:
            self._advance(record)
        except Exception as exc:  # never stuck: an unforeseen failure ends the deployment, with its reason
            INTERNAL_ERRORS.record("deployer", exc)
            latest = self.journal.get(record.deployment_id)
            if not latest.terminal:
                self._move(latest, "failed", f"internal error in step {latest.state}: {exc}")

    # -- documents ----------------------------------------------------------------------------------

    def _take_documents(self, wait_s: float = 0.0) -> None:
        try:
            item = self._incoming.get(timeout=wait_s) if wait_s > 0 else self._incoming.get_nowait()
        except queue.Empty:
            return
        while True:
            # One bad document must not fail the deployment in progress (this also runs inside its download).
            with INTERNAL_ERRORS.guard("deployer"):
                self._consider(*item)
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return

    def _consider(self, kind: str, topic: str, payload: bytes) -> None:
        if not payload:
            log.warning("deploy: zero-length retained message on %s ignored (a cancel is a signed document)", topic)
            return
        digest = hashlib.sha256(payload).hexdigest()
        if self._seen.get(topic) == digest:
            return  # the same retained document again (a reconnect): nothing to do twice
        self._seen[topic] = digest
        if kind == "keys":
            try:
                self._trust.accept_key_list(payload)
            except DeployError as exc:
                log.error("deploy: %s", exc)
            return
        try:
            document = self._trust.verify_deployment(payload)
            check_target(document, kind, self.device_id, self._groups)
        except DeployError as exc:
            self._refuse(topic, str(exc))
            return
        last = self.journal.last_sequence()
        journaled = self._journaled(document.deployment_id)
        if document.sequence <= last:
            if journaled:
                log.debug("deploy: %s (sequence %d) is already journaled", document.deployment_id, document.sequence)
            else:
                self._refuse(topic, f"replayed or older document: sequence {document.sequence} is not above {last}",
                             document)  # fmt: skip
        elif journaled:
            self._refuse(topic, f"deployment id {document.deployment_id} was used before", document)
        else:
            self._accept(topic, payload, document)

    def _accept(self, topic: str, payload: bytes, document: DeploymentDocument) -> None:
        manifest = self._manifest(document)
        bundle = (manifest.bundle_id, manifest.model_id, manifest.version) if manifest is not None else None
        previous = self._current()
        record = self.journal.accept(document.deployment_id, document.sequence, topic, payload.decode(), bundle)
        self._steps.entered(record)
        self._refresh_snapshot()
        self._send(record)
        log.info("deploy: accepted %s (sequence %d, %s) from %s", record.deployment_id, record.sequence,
                 document.action, topic)  # fmt: skip
        if previous is not None:
            self._end_previous(previous, document)
        if document.action == "cancel":
            what = f"deployment {previous.deployment_id}" if previous is not None else "nothing (none in progress)"
            self._move(record, "cancelled", f"cancel document: cancelled {what}")

    def _end_previous(self, previous: DeploymentRecord, newer: DeploymentDocument) -> None:
        if newer.action == "cancel":
            if previous.state in ("activating", "probation"):
                self._roll_back(previous)
            self._move(previous, "cancelled", f"cancelled by {newer.deployment_id} (sequence {newer.sequence})")
        else:
            note = "; left serving" if previous.state == "probation" else ""
            self._move(previous, "superseded",
                       f"superseded by {newer.deployment_id} (sequence {newer.sequence}){note}")  # fmt: skip

    def _refuse(self, topic: str, reason: str, document: DeploymentDocument | None = None) -> None:
        log.error("deploy: document on %s refused: %s", topic, reason)
        record: dict[str, Any] = {"event": "refused", "topic": topic, "reason": reason, "at": self._wall()}
        if document is not None:
            record.update(deployment_id=document.deployment_id, sequence=document.sequence)
        self._report(record)

    def _journaled(self, deployment_id: str) -> bool:
        try:
            self.journal.get(deployment_id)
        except DeployError:
            return False
        return True

    # -- steps --------------------------------------------------------------------------------------

    def _advance(self, record: DeploymentRecord) -> None:
        document = record.deployment_document()
        reason = overdue(record, document, self._wall(), self._steps.elapsed_s(record))
        if reason is not None:
            self._time_out(record, reason)
            return
        manifest = self._manifest(document)
        assert manifest is not None, "only deploy documents stay unfinished"
        if record.state == "received":
            check = self._runnable_here(record, manifest)
            if check is not None:
                self._move(record, "verified", check)
        elif record.state == "verified":
            try:
                self._transfer.reserve(manifest)
            except DeployError as exc:
                self._move(record, "failed", str(exc))
                return
            chunks = sum(len(f.chunks) for f in manifest.files)
            self._move(record, "downloading", f"{manifest.total_bytes} bytes in {chunks} chunks")
        elif record.state == "downloading":
            self._download(record, document, manifest)
        elif record.state == "staged":
            if record.deployment_id not in self._warmed:
                self._warm(record, document, manifest)
            elif self._may_activate(document):
                self._move(record, "activating", None)
            # else outside the maintenance window: staged, warmed, until it opens (or the deadline passes)
        elif record.state == "activating":
            self._activate(record, document, manifest)
        elif record.state == "probation":
            self._watch(record, document, manifest)

    def _runnable_here(self, record: DeploymentRecord, manifest: BundleManifest) -> str | None:
        try:
            check_requirements(manifest, runtime=self._runtime, agent_version=self._agent_version)
        except DeployError as exc:
            self._move(record, "failed", str(exc))
            return None
        return f"bundle {manifest.bundle_id} signed and runnable here"

    def _download(self, record: DeploymentRecord, document: DeploymentDocument, manifest: BundleManifest) -> None:
        def interrupted() -> str | None:
            if self._stopping.is_set():
                return "stopping"
            self._take_documents()
            latest = self.journal.get(record.deployment_id)
            if latest.terminal:
                return latest.state
            return overdue(latest, document, self._wall(), self._steps.elapsed_s(latest))

        try:
            outcome = self._transfer.fetch(manifest, interrupted)
        except DeployError as exc:
            self._move(record, "failed", str(exc))
            return
        if isinstance(outcome, dict):
            self._move(record, "staged", f"{len(outcome)} file(s) verified in {self._transfer.bundle_dir(manifest)}")
            return
        latest = self.journal.get(record.deployment_id)
        if not latest.terminal and outcome != "stopping":
            self._time_out(latest, outcome)

    def _warm(self, record: DeploymentRecord, document: DeploymentDocument, manifest: BundleManifest) -> None:
        try:
            self._activation.warm(self._staged(record, document, manifest))
        except DeployError as exc:
            self._move(record, "failed", f"refused before activation: {exc}")
            return
        self._warmed.add(record.deployment_id)

    def _activate(self, record: DeploymentRecord, document: DeploymentDocument, manifest: BundleManifest) -> None:
        # Swapping in a version not warmed in this process (a restart) loads it first: the activator's part.
        staged = self._staged(record, document, manifest)
        self._warmed.discard(record.deployment_id)
        try:
            # Repeated after a crash, it returns the same previous version (the Activation contract).
            previous = self._activation.activate(staged)
        except DeployError as exc:
            self._move(record, "failed", f"activation failed: {exc}")
            return
        self._probation_since[record.deployment_id] = self._clock()
        self._move(record, "probation", f"serving {manifest.version}; watching {document.probation.model_dump()}",
                   previous=previous.model_dump(mode="json"))  # fmt: skip

    def _watch(self, record: DeploymentRecord, document: DeploymentDocument, manifest: BundleManifest) -> None:
        # After a restart the probation window starts again: the process it watched is gone.
        since = self._probation_since.setdefault(record.deployment_id, self._clock())
        verdict = self._activation.probation(self._staged(record, document, manifest), since)
        if verdict.state == "passed":
            self._probation_since.pop(record.deployment_id, None)
            self._move(record, "active", f"probation passed: {verdict.reason or f'{verdict.requests} requests'}")
        elif verdict.state == "failed":
            self._probation_since.pop(record.deployment_id, None)
            self._roll_back(record)
            self._move(record, "rolled_back", f"probation failed: {verdict.reason}")

    def _give_up(self, record: DeploymentRecord) -> None:
        """A version staged (perhaps warmed) but ended before serving: the activator unloads and removes it."""
        self._warmed.discard(record.deployment_id)
        document = record.deployment_document()
        manifest = self._manifest(document)
        if manifest is not None:
            try:
                self._activation.discard(self._staged(record, document, manifest))
            except DeployError as exc:
                log.error("deploy: could not give up %s: %s", record.deployment_id, exc)

    def _roll_back(self, record: DeploymentRecord) -> None:
        if record.previous is not None:
            self._activation.roll_back(PreviousVersion.model_validate(record.previous))

    def _time_out(self, record: DeploymentRecord, reason: str) -> None:
        self._move(record, "timed_out", reason)

    def _staged(self, record: DeploymentRecord, document: DeploymentDocument, manifest: BundleManifest) -> StagedModel:
        return StagedModel(
            deployment_id=record.deployment_id, model_id=manifest.model_id, version=manifest.version,
            file=self._transfer.bundle_dir(manifest) / manifest.entry.file, entry=manifest.entry,
            references=manifest.references, probation=document.probation,
        )  # fmt: skip

    def _manifest(self, document: DeploymentDocument) -> BundleManifest | None:
        # Verified when the document was accepted; parsed again here, not re-checked for expiry mid-deployment.
        return None if document.bundle is None else BundleManifest.model_validate(document.bundle.payload)

    # -- journal and reports ------------------------------------------------------------------------

    def _move(self, record: DeploymentRecord, state: State, reason: str | None, **fields: Any) -> None:
        moved = self.journal.transition(record.deployment_id, state, reason, **fields)
        self._steps.entered(moved)
        if moved.terminal and record.state in ("staged", "activating"):
            self._give_up(record)
        if moved.terminal and moved.bundle_id and not any(
            other.bundle_id == moved.bundle_id for other in self.journal.unfinished()
        ):
            # Staging is only ever a step on the way: a newer deployment of the same bundle keeps it.
            self._transfer.discard(moved.bundle_id)
        log.log(logging.ERROR if state in ("failed", "rolled_back", "timed_out") else logging.INFO,
                "deploy: %s -> %s%s", moved.deployment_id, state, f": {reason}" if reason else "")  # fmt: skip
        self._refresh_snapshot()  # before reporting: the report republishes the status, which shows it
        self._send(moved)

    def _send(self, record: DeploymentRecord) -> None:
        self._report({
            "event": "transition", "deployment_id": record.deployment_id, "sequence": record.sequence,
            "state": record.state, "reason": record.reason, "model_id": record.model_id, "version": record.version,
            "at": record.entered_at,
        })  # fmt: skip

    def _refresh_snapshot(self) -> None:
        self.snapshot = self.journal.snapshot()

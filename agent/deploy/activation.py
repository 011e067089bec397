"""Stage, warm, swap, watch: a verified model version put into service beside the old one, and taken back out.

:class:`ModelActivator` is the :class:`~agent.deploy.staged.Activation` the deployment state machine drives,
composed with the model manager and its hot-update path, never beside them:

* **warm**: the staged file is copied into ``models_dir`` under a name of its own (``<id>-<version>-<sha>``,
  so no version ever overwrites another's file) and loaded beside the serving version by
  :meth:`~agent.models.manager.ModelManager.warm`: the entry checked against the file as any reload checks it,
  the interpreter built and allocated within the model memory budget and the process soft limit (a version that
  cannot fit is refused before anything changes), then the reference cases run on it and compared within
  their tolerance (:mod:`agent.deploy.references`).
* **activate**: what serves now is recorded (``models_dir/.deploy/<id>.json``, written before the manifest, so
  repeating an activation after a crash returns the same previous version), the manifest entry replaced
  atomically (:mod:`agent.models.authoring`'s writer) and the catalogue reloaded: requests in flight finish on
  the old version, the next ones find the warmed one already loaded. The previous version's file stays.
* **probation**: the new version's runs answered and failed (counted per version in
  :class:`agent.models.stats.Measurements`), its median latency against the previous version's, and memory,
  judged by :func:`agent.deploy.probation.judge`. Memory is the anonymous resident memory at its peak since
  the previous poll (:func:`agent.observe.memory.take_peak_anon_rss`), so a run that allocates a lot briefly
  between two polls is seen; where the kernel's peak cannot be reset, only what each poll samples.
* **roll_back**: the previous entry written back (or the model's entry removed, if it was new or a bundled
  default showed through) and the catalogue reloaded, the same way.

Every step is safe to repeat: each compares what is on disk with what it would write, and writes only the
difference.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.config import BUNDLED_MODELS_DIR
from agent.deploy.probation import Observation, judge
from agent.deploy.references import reference_mismatch
from agent.deploy.staged import PreviousVersion, ProbationVerdict, StagedModel
from agent.errors import DeployError, ModelError, RequestError
from agent.models.authoring import manifest_with_entry, read_manifest_json, write_atomically, write_manifest
from agent.models.catalog import ModelEntry
from agent.models.inference import LoadedModel
from agent.models.manager import ModelManager
from agent.models.stats import RunCounts
from agent.observe.memory import MB, anon_rss_bytes, take_peak_anon_rss

log = logging.getLogger(__name__)

RECORDS_DIR = ".deploy"
INSTALLED_SUFFIX = ".tflite"


class ActivationRecord(BaseModel):
    """What an activation replaced, kept on disk so that a repeated activation returns the same answer."""

    model_config = ConfigDict(extra="forbid")

    deployment_id: str
    version: str
    sha256: str
    previous: PreviousVersion


class ModelActivator:
    """Warms, swaps in, watches and rolls back model versions in the model manager's ``models_dir``."""

    def __init__(
        self,
        models: ModelManager,
        *,
        clock: Callable[[], float] = time.monotonic,
        proc_self: Path = Path("/proc/self"),
    ) -> None:
        self.models = models
        self.models_dir = models.models_dir
        self._clock = clock
        self._proc_self = proc_self
        # The probation whose memory peak is being followed (deployment, sha256, since): its first poll resets
        # the peak, which until then holds the warming of both versions and whatever came before.
        self._peak_window: tuple[str, str, float] | None = None
        self._peak_unavailable_logged = False
        # Runs a version had already made in this process when a deployment swapped it in (a version deployed
        # again after a roll back): probation counts from there.
        self._baselines: dict[tuple[str, str], RunCounts] = {}

    # ---- warm ------------------------------------------------------------------------------------

    def warm(self, staged: StagedModel) -> None:
        """Load the staged version beside the serving one and run its reference cases; :class:`DeployError`
        with the reason if it does not match its file, cannot fit, will not load or answers otherwise."""
        declared = self.installed_entry(staged)
        self._place_file(staged, declared)
        if self._serves(declared):
            with self.models.lease(declared.id) as loaded:
                self._check_references(staged, loaded)
            return
        try:
            loaded = self._warm_load(declared)
            self._check_references(staged, loaded)
        except DeployError as exc:
            log.warning("model %s %s refused before activation: %s", declared.id, declared.version, exc)
            self.discard(staged)
            raise

    def _warm_load(self, declared: ModelEntry) -> LoadedModel:
        try:
            return self.models.warm(declared)
        except ModelError as exc:
            raise DeployError(f"the bundle's entry does not match its file: {exc}") from None
        except RequestError as exc:  # too large, no room, or the runtime cannot load it
            raise DeployError(f"{exc.name}: {exc.message}") from None

    def _check_references(self, staged: StagedModel, loaded: LoadedModel) -> None:
        for number, case in enumerate(staged.references, start=1):
            problem = reference_mismatch(loaded, case)
            if problem is not None:
                raise DeployError(f"reference case {number} of {len(staged.references)}: {problem}")

    # ---- activate and roll back ------------------------------------------------------------------

    def activate(self, staged: StagedModel) -> PreviousVersion:
        """Swap the staged version in through the manifest (in-flight requests finish on the old version) and
        return what served before; the previous version's file stays on disk."""
        self._require_writable()
        declared = self.installed_entry(staged)
        record = self._read_record(staged.model_id)
        stale = None  # the version before the previous one: no roll back reaches it after this activation
        if record is None or (record.deployment_id, record.sha256) != (staged.deployment_id, declared.sha256):
            stale = record.previous.entry if record is not None else None
            record = ActivationRecord(
                deployment_id=staged.deployment_id, version=declared.version, sha256=declared.sha256,
                previous=PreviousVersion(model_id=staged.model_id, entry=self.models.catalog.declared.get(staged.model_id)),
            )
            self._write_record(staged.model_id, record)
        self._place_file(staged, declared)
        self._baselines.setdefault(
            (staged.deployment_id, declared.sha256), self.models.measurements.runs(declared.id, declared.sha256)
        )
        if not self._serves(declared):
            self._warm_load(declared)
            self._write_entry(staged.model_id, declared)
            self.models.reload()
        if not self._serves(declared):
            reason = self.models.catalog.refused.get(staged.model_id) or "the manifest change was not taken up"
            self.roll_back(record.previous, f"the new version was refused on swap: {reason}")
            raise DeployError(f"model {staged.model_id!r} {declared.version} was refused on swap: {reason}")
        if stale is not None and stale != record.previous.entry:
            self._remove_installed(stale)
        log.info(
            "model %s %s activated for deployment %s (previous: %s)", declared.id, declared.version,
            staged.deployment_id, record.previous.entry.version if record.previous.entry else "none",
        )
        return record.previous

    def roll_back(self, previous: PreviousVersion, reason: str | None = None) -> None:
        """Serve ``previous`` again, or remove the model's entry if it was new (a bundled default it replaced
        shows through again); ``reason`` is logged."""
        self._require_writable()
        model_id, entry = previous.model_id, previous.entry
        log.warning(
            "rolling model %s back to %s: %s", model_id, entry.version if entry else "no version", reason or "asked to"
        )
        # A bundled default is named by its absolute path (the only absolute names a manifest may hold).
        restored = None if entry is None or Path(entry.file).is_absolute() else entry
        if restored is not None and not (self.models_dir / restored.file).is_file():
            raise DeployError(f"cannot roll model {model_id!r} back: the file {restored.file} of {restored.version} is gone")
        self.models.discard_warm(model_id)
        rolled_back = self.models.catalog.declared.get(model_id)
        self._write_entry(model_id, restored)
        self.models.reload()
        serving = self.models.catalog.declared.get(model_id)
        if serving != entry:
            now = serving.version if serving else "nothing"
            raise DeployError(f"rolled model {model_id!r} back, but the catalogue serves {now}")
        if rolled_back is not None and rolled_back != entry:
            self._remove_installed(rolled_back)

    def discard(self, staged: StagedModel) -> None:
        """Give up a staged version before activation (refused, superseded, cancelled): unload it if it was
        warmed, and delete its copy in ``models_dir`` unless the manifest names it."""
        declared = self.installed_entry(staged)
        if self._serves(declared):
            return
        self.models.discard_warm(declared.id, declared)
        self._remove_installed(declared)

    # ---- probation -------------------------------------------------------------------------------

    def probation(self, staged: StagedModel, since: float) -> ProbationVerdict:
        """The verdict so far on the staged version, activated at monotonic time ``since``."""
        declared = self.installed_entry(staged)
        catalog = self.models.catalog
        if not self._serves(declared):
            serving = catalog.declared.get(staged.model_id)
            now = f"version {serving.version}" if serving is not None else "nothing"
            return ProbationVerdict(state="failed", reason=f"model {staged.model_id!r} serves {now}, not {declared.version}")
        measurements = self.models.measurements
        record = self._read_record(staged.model_id)
        previous = record.previous.entry if record is not None and record.sha256 == declared.sha256 else None
        runs = measurements.runs(declared.id, declared.sha256)
        before = self._baselines.get((staged.deployment_id, declared.sha256), RunCounts())
        entry = catalog.models[declared.id]
        window = (staged.deployment_id, declared.sha256, since)
        process_problem, memory_note = self._process_memory_problem(entry, window)
        seen = Observation(
            runs=RunCounts(runs.answered - before.answered, runs.failed - before.failed),
            elapsed_s=self._clock() - since,
            median_ms=measurements.median_latency_ms(declared.id, declared.sha256),
            previous_median_ms=measurements.median_latency_ms(previous.id, previous.sha256) if previous else None,
            memory_problem=process_problem or self._budget_problem(entry),
            memory_note=memory_note,
        )
        return judge(staged.probation, declared.version, seen)

    def _process_memory_problem(
        self, entry: ModelEntry, window: tuple[str, str, float]
    ) -> tuple[str | None, str | None]:
        """Whether the process went over its soft limit since the previous poll, and a note when only this
        poll's sample could be checked."""
        limit = self.models.process_limit_bytes
        if limit is None:
            return None, None
        peak = take_peak_anon_rss(self._proc_self)
        held = anon_rss_bytes(self._proc_self)
        # The window's first poll only resets the peak: until then it holds both versions warming, and older spikes.
        first_poll, self._peak_window = window != self._peak_window, window
        serving = f"with {entry.id} {entry.version} serving, over its soft limit of {limit / MB:.0f} MB"
        if held > limit:
            return f"the agent holds {held / MB:.0f} MB (anonymous resident) {serving}", None
        if peak is not None and not first_poll and peak > limit:
            return (f"the agent's anonymous resident memory peaked at {peak / MB:.0f} MB between two checks "
                    f"({held / MB:.0f} MB now) {serving}"), None  # fmt: skip
        if peak is None:
            if not self._peak_unavailable_logged:
                self._peak_unavailable_logged = True
                log.warning("%s/clear_refs cannot reset the peak RSS here: probation checks memory only at its "
                            "polls, and a spike between two polls goes unseen", self._proc_self)  # fmt: skip
            return None, "memory sampled at each check only (the kernel's peak RSS cannot be reset here)"
        return None, None

    def _budget_problem(self, entry: ModelEntry) -> str | None:
        stats = self.models.stats(entry)
        if not stats.fits:
            measured = f"{stats.memory_bytes / MB:.1f} MB" if stats.memory_bytes is not None else "its file"
            return f"{entry.id} {entry.version} holds {measured}, more than the model memory budget allows"
        return None

    # ---- files, records and the manifest ---------------------------------------------------------

    def installed_entry(self, staged: StagedModel) -> ModelEntry:
        """The manifest entry the staged version is installed under: its file's versioned name in ``models_dir``."""
        entry = staged.entry
        if (entry.id, entry.version) != (staged.model_id, staged.version):
            raise DeployError(
                f"the bundle's entry is {entry.id} {entry.version}, the deployment names {staged.model_id} {staged.version}"
            )
        safe_version = re.sub(r"[^A-Za-z0-9._-]", "_", entry.version)[:64]
        name = f"{entry.id}-{safe_version}-{entry.sha256[:12]}{INSTALLED_SUFFIX}"
        return entry.model_copy(update={"file": name})

    def _remove_installed(self, entry: ModelEntry) -> None:
        """Delete a version's file if a deployment installed it (its name says so) and the manifest names it no
        more; the operator's own files are never touched."""
        if Path(entry.file).name != entry.file or not entry.file.endswith(f"-{entry.sha256[:12]}{INSTALLED_SUFFIX}"):
            return
        manifest_files = {model.file for model in self.models.catalog.declared.values()}
        if entry.file not in manifest_files:
            log.info("removing %s: model %s %s is out of service", entry.file, entry.id, entry.version)
            (self.models_dir / entry.file).unlink(missing_ok=True)

    def _serves(self, declared: ModelEntry) -> bool:
        catalog = self.models.catalog
        return catalog.declared.get(declared.id) == declared and declared.id not in catalog.refused

    def _place_file(self, staged: StagedModel, declared: ModelEntry) -> None:
        self._require_writable()
        target = self.models_dir / declared.file
        if target.is_file() and _sha256(target) == declared.sha256:
            return
        try:
            content = staged.file.read_bytes()
        except OSError as exc:
            raise DeployError(f"cannot read the staged file {staged.file}: {exc.strerror}") from None
        actual = hashlib.sha256(content).hexdigest()
        if actual != declared.sha256:
            raise DeployError(f"the staged file has sha256 {actual[:16]}..., the bundle says {declared.sha256[:16]}...")
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(target, content)
        except OSError as exc:
            raise DeployError(f"cannot write {target}: {exc.strerror}") from None

    def _write_entry(self, model_id: str, entry: ModelEntry | None) -> None:
        try:
            manifest = manifest_with_entry(self.models_dir, model_id, entry)
            if manifest != read_manifest_json(self.models_dir):
                write_manifest(self.models_dir, manifest)
        except ModelError as exc:
            raise DeployError(str(exc)) from None
        except (OSError, ValueError) as exc:  # ValueError: the manifest changed under us, half written
            raise DeployError(f"cannot rewrite the manifest in {self.models_dir}: {exc}") from None

    def _record_path(self, model_id: str) -> Path:
        return self.models_dir / RECORDS_DIR / f"{model_id}.json"

    def _read_record(self, model_id: str) -> ActivationRecord | None:
        try:
            return ActivationRecord.model_validate_json(self._record_path(model_id).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.error("activation record of model %s unreadable, ignored: %s", model_id, exc)
            return None

    def _write_record(self, model_id: str, record: ActivationRecord) -> None:
        path = self._record_path(model_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, record.model_dump_json(indent=2).encode("utf-8"))
        except OSError as exc:
            raise DeployError(f"cannot write {path}: {exc.strerror}") from None

    def _require_writable(self) -> None:
        if self.models_dir.resolve() == BUNDLED_MODELS_DIR.resolve():
            raise DeployError("no models_dir is configured: deployments install into a writable models_dir")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

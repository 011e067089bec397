"""Which models exist: the catalogue read from the manifest, verified, reloaded and warmed.

The catalogue (:class:`agent.models.catalog.Catalog`) is swapped whole when the manifest changes
(:meth:`ModelManager.reload`): a request resolves its model once, so it sees the old version or the new
one, never a mix. Which models are loaded, the memory budget they live in and the requests that hold them are
:class:`agent.models.residency.LoadedModels`, which the manager installs each catalogue into; the manager
passes on its leases, measurements and memory readings, so callers see one object.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path

from agent.config import BUNDLED_MODELS_DIR, AcceleratorChoice, InferenceSettings, Limits, RuntimeChoice
from agent.errors import ModelError, ModelTooLarge, RequestError
from agent.models.accelerators import load_runtime
from agent.models.catalog import Catalog, ModelEntry, build_catalog, read_manifest
from agent.models.gate import FairGate
from agent.models.inference import LoadedModel
from agent.models.loader import ModelLoader
from agent.models.modelfile import complete_from_file
from agent.models.probe import ModelProbe, allowance_for
from agent.models.residency import LoadedModels
from agent.models.stats import Measurements, ModelStats

log = logging.getLogger(__name__)

LOAD_WAIT_S = 30.0


class ModelManager:
    """The catalogue of servable models and the loaded ones, safe to use from every worker thread."""

    def __init__(
        self,
        models_dir: Path,
        *,
        defaults_dir: Path | None = None,
        num_threads: int = 1,
        max_concurrent_inferences: int = 2,
        memory_budget_mb: int | None = None,
        process_limit_mb: int | None = None,
        load_wait_s: float = LOAD_WAIT_S,
        runtime: RuntimeChoice = "auto",
        accelerator: AcceleratorChoice = "cpu",
        accelerator_required: bool = False,
        state_dir: Path | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.defaults_dir = defaults_dir
        self.runtime = load_runtime(runtime)
        # Every file's first opening with the runtime is done in a child first; verdicts kept in state_dir.
        self.probe = ModelProbe(self.runtime, state_dir=state_dir, allowance_bytes=allowance_for(process_limit_mb))
        self.max_concurrent_inferences = max_concurrent_inferences
        # Verifying an entry also checks it against its file and fills in what it leaves out.
        self._complete_from_file = partial(complete_from_file, models_dir, self.probe)
        manifest = read_manifest(self.models_dir, self.defaults_dir)
        self._loader = ModelLoader(
            models_dir,
            self.probe,
            num_threads=num_threads,
            gate=FairGate(max_concurrent_inferences),
            max_interpreters=max_concurrent_inferences,
            default_accelerator=accelerator,
            accelerator_required=accelerator_required,
        )
        self._reload_lock = threading.Lock()
        # Told of every load, unload, refusal and version swap, e.g. for metrics and the audit trail; it is
        # called with the loaded models' lock held at times, so it must only hand the event on.
        self.on_event: Callable[..., None] = lambda kind, **detail: None
        self._models = LoadedModels(
            models_dir,
            Catalog({entry.id: entry for entry in manifest.models}, {e.id: e for e in manifest.ensembles}, {}, {}),
            self._loader,
            memory_budget_mb=memory_budget_mb,
            process_limit_mb=process_limit_mb,
            load_wait_s=load_wait_s,
            # Looked up at each event: the app sets on_event after the manager is made.
            on_event=lambda kind, **detail: self.on_event(kind, **detail),
        )
        self.measurements: Measurements = self._models.measurements
        self.budget_bytes = self._models.budget_bytes  # the model memory budget (None: unbounded)

    @property
    def process_limit_bytes(self) -> int | None:
        """The process soft limit a load must stay under (None: none)."""
        return self._models.process_limit()

    @process_limit_bytes.setter
    def process_limit_bytes(self, limit: int | None) -> None:
        self._models.set_process_limit(limit)

    @classmethod
    def for_limits(
        cls,
        models_dir: Path | None,
        limits: Limits,
        inference: InferenceSettings | None = None,
        *,
        state_dir: Path | None = None,
    ) -> ModelManager:
        """The bundled models overlaid by ``models_dir``'s (if set), with the threads, concurrency, model memory
        budget and process soft limit of ``limits`` and the runtime and accelerators of ``inference``; model
        probe verdicts are kept in ``state_dir`` (if set)."""
        inference = inference or InferenceSettings()
        return cls(
            models_dir or BUNDLED_MODELS_DIR,
            defaults_dir=BUNDLED_MODELS_DIR if models_dir is not None else None,
            runtime=inference.runtime,
            accelerator=inference.accelerator,
            accelerator_required=inference.required,
            num_threads=limits.num_threads,
            max_concurrent_inferences=limits.max_concurrent_inferences,
            memory_budget_mb=limits.model_memory_mb,
            process_limit_mb=limits.process_soft_limit_mb,
            state_dir=state_dir,
        )

    # ---- the catalogue ---------------------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        """The catalogue in service now (swapped whole by :meth:`reload`)."""
        return self._models.catalog

    @property
    def servable_ids(self) -> list[str]:
        """Models and ensembles this device serves."""
        return self._models.catalog.servable_ids

    def entry(self, model_id: str) -> ModelEntry:
        """The catalogue entry of ``model_id``; :class:`InvalidParams` naming the servable ones if unknown."""
        return self._models.entry(model_id)

    def verify_all(self) -> dict[str, str]:
        """Check every model file's sha256; returns (and remembers) the refused ones with the reason."""
        with self._reload_lock:
            self._models.install(
                build_catalog(self.models_dir, read_manifest(self.models_dir, self.defaults_dir), complete=self._complete)
            )
        return dict(self.catalog.refused)

    def reload(self) -> bool:
        """Re-read the manifest and swap in what changed; False (old catalogue kept) if it is unusable.

        Models whose entry or file changed are verified again; a new version with a bad file is refused
        and the old one keeps serving. Replaced and removed models are unloaded once their requests in
        flight are done. Pinned models of the new catalogue are loaded.
        """
        with self._reload_lock:
            try:
                manifest = read_manifest(self.models_dir, self.defaults_dir)
            except ModelError as exc:
                log.error("manifest change refused, still serving the previous catalogue: %s", exc)
                return False
            previous = self.catalog.models
            self._models.install(build_catalog(self.models_dir, manifest, self.catalog, self._complete))
        for model_id, entry in previous.items():
            current = self.catalog.models.get(model_id)
            if current is None:
                self.on_event("model_removed", model=model_id, version=entry.version)
            elif current.version != entry.version or current.sha256 != entry.sha256:
                self.on_event("model_swapped", model=model_id, old=entry.version, new=current.version)
        for model_id in self.catalog.pinned_ids:
            try:
                with self.lease(model_id):
                    pass
            except RequestError as exc:
                log.error("pinned model %s cannot be kept loaded: %s", model_id, exc.message)
        return True

    def warm(self, declared: ModelEntry) -> LoadedModel:
        """Load a new version of a model beside the one serving, before the manifest names it.

        ``declared`` is its manifest entry as it will be written, its file already in ``models_dir``; it is checked
        against the file and completed as a reload would, and loaded within the model memory budget and the
        process soft limit beside everything loaded now (idle models may be unloaded to make room). It stays
        loaded, outside the catalogue, until a reload swaps in the same entry (whose first request then finds
        it loaded), :meth:`discard_warm`, or another version is warmed: one at a time. Raises
        :class:`ModelError` (entry and file differ), :class:`ModelTooLarge`, :class:`Overloaded` (no room made
        within ``load_wait_s``) or :class:`ModelUnavailable` (the runtime cannot load it).
        """
        warmed = self._models.warmed(declared)
        if warmed is not None and warmed[1] is not None:
            return warmed[1]
        return self._models.warm(declared, self._complete_from_file(declared))

    def _complete(self, declared: ModelEntry) -> ModelEntry:
        """``declared`` checked against its (verified) file and completed; for the version warmed from the same
        entry, what the warm found, so that the swap does not read the file with the runtime again."""
        warmed = self._models.warmed(declared)
        return warmed[0] if warmed is not None else self._complete_from_file(declared)

    def discard_warm(self, model_id: str, declared: ModelEntry | None = None) -> None:
        """Unload the version of ``model_id`` warmed by :meth:`warm` (if any; with ``declared``, only if it was
        warmed from that entry): it will not be swapped in."""
        self._models.discard_warm(model_id, declared)

    def load_pinned(self) -> None:
        """Load every pinned model (at start); one that cannot be served or does not fit is a :class:`ModelError`."""
        for model_id in self.catalog.pinned_ids:
            reason = self.catalog.refused.get(model_id)
            if reason is not None:
                raise ModelError(f"pinned model {model_id!r} cannot be served: {reason}")
            try:
                with self.lease(model_id):
                    pass
            except ModelTooLarge as exc:
                raise ModelError(f"pinned model {model_id!r} does not fit: {exc.message}") from None
            except RequestError as exc:
                raise ModelError(f"pinned model {model_id!r} cannot be loaded: {exc.message}") from None

    def load_accelerated(self) -> None:
        """Load every model that asks for an accelerator (at start, with ``[inference] required = true``): one whose
        accelerator is missing or refuses it is a :class:`ModelError`."""
        for entry in list(self.catalog.models.values()):
            if entry.id in self.catalog.refused or not self._loader.wants_accelerator(entry):
                continue
            try:
                with self.lease(entry.id):
                    pass
            except RequestError as exc:
                raise ModelError(f"model {entry.id!r} cannot be loaded on its accelerator: {exc.message}") from None

    def accelerator_report(self, entry: ModelEntry) -> dict[str, str | None]:
        """The accelerator ``entry`` asks for, the one it runs on (None until loaded) and why they differ."""
        return self._loader.accelerator_report(entry)

    # ---- what the loaded models answer ------------------------------------------------------------

    def lease(self, model_id: str) -> AbstractContextManager[LoadedModel]:
        """The loaded model (loading it first if needed), kept loaded until the block ends."""
        return self._models.lease(model_id)

    def accelerators_in_use(self) -> dict[str, str]:
        """Each loaded model's accelerator, as the status and /metrics report it."""
        return self._models.accelerators_in_use()

    def unload_idle(self) -> int:
        """Under memory pressure: unload every unpinned model no request holds, and spare interpreters."""
        return self._models.unload_idle()

    @property
    def memory_used_bytes(self) -> int:
        """Measured memory of every loaded (or still draining) model."""
        return self._models.memory_used_bytes

    def runs_within(self, model_id: str, max_ms: float) -> bool:
        """Whether ``model_id`` is a loaded model (not an ensemble) whose runs average at most ``max_ms``."""
        return self._models.runs_within(model_id, max_ms)

    @property
    def loaded_ids(self) -> list[str]:
        """Models loaded now."""
        return self._models.loaded_ids

    def stats(self, entry: ModelEntry) -> ModelStats:
        """Loaded or not, measured memory (live if loaded), latency average, load time, whether it can ever fit."""
        return self._models.stats(entry)

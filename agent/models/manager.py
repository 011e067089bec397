"""Which models exist, which are loaded, and which requests hold them.

A loaded model stays within the model memory budget and the process soft limit
(:class:`agent.models.budget.MemoryBudget`, which also says how a model's cost is measured). Requests hold a
model through :meth:`ModelManager.lease`; a model that is unloaded or replaced while leased is closed only when
its last lease ends, so requests in flight finish on the interpreters they started with. Closing drops
every interpreter, then the heap is trimmed so the memory really goes back to the kernel.

The catalogue (:class:`agent.models.catalog.Catalog`) is swapped whole when the manifest changes
(:meth:`ModelManager.reload`): a request resolves its model once, so it sees the old version or the new
one, never a mix.

One lock (a condition, so a load can wait for memory that leased models hold) guards the slot table, the
budget and the load failures; nothing waits on another thread while holding it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from agent.config import BUNDLED_MODELS_DIR, AcceleratorChoice, InferenceSettings, Limits, RuntimeChoice
from agent.errors import InvalidParams, ModelError, ModelTooLarge, ModelUnavailable, Overloaded, RequestError
from agent.models.accelerators import load_runtime
from agent.models.budget import MemoryBudget, ModelSlot, SlotTable
from agent.models.catalog import Catalog, ModelEntry, build_catalog, read_manifest
from agent.models.gate import FairGate
from agent.models.inference import LoadedModel
from agent.models.loader import ModelLoader
from agent.models.modelfile import complete_from_file
from agent.models.probe import ModelProbe, allowance_for
from agent.models.stats import Measurements, ModelStats
from agent.observe.memory import MB, return_freed_memory

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
        self.load_wait_s = load_wait_s
        # Verifying an entry also checks it against its file and fills in what it leaves out.
        self._complete_from_file = partial(complete_from_file, models_dir, self.probe)
        self._warmed_from: dict[str, ModelEntry] = {}  # model id -> the declared entry of the version warmed
        manifest = read_manifest(self.models_dir, self.defaults_dir)
        self._catalog = Catalog(
            {entry.id: entry for entry in manifest.models}, {e.id: e for e in manifest.ensembles}, {}, {}
        )
        self._loader = ModelLoader(
            models_dir,
            self.probe,
            num_threads=num_threads,
            gate=FairGate(max_concurrent_inferences),
            max_interpreters=max_concurrent_inferences,
            default_accelerator=accelerator,
            accelerator_required=accelerator_required,
        )
        self._cond = threading.Condition()
        self._reload_lock = threading.Lock()
        self._slots = SlotTable()
        self._load_failures: dict[tuple[str, str], str] = {}
        # Told of every load, unload, refusal and version swap, e.g. for metrics and the audit trail; it is
        # called with the manager's lock held at times, so it must only hand the event on.
        self.on_event: Callable[..., None] = lambda kind, **detail: None
        self.measurements = Measurements()
        self._budget = MemoryBudget(
            self._slots,
            budget_bytes=memory_budget_mb * MB if memory_budget_mb is not None else None,
            process_limit_bytes=process_limit_mb * MB if process_limit_mb is not None else None,
            measurements=self.measurements,
            file_size=lambda entry: self._catalog.file_size(self.models_dir, entry),
            # Looked up at each event: the app sets on_event after the manager is made.
            on_event=lambda kind, **detail: self.on_event(kind, **detail),
        )

    @property
    def budget_bytes(self) -> int | None:
        """The model memory budget (None: unbounded)."""
        return self._budget.budget_bytes

    @property
    def process_limit_bytes(self) -> int | None:
        """The process soft limit a load must stay under (None: none)."""
        return self._budget.process_limit_bytes

    @process_limit_bytes.setter
    def process_limit_bytes(self, limit: int | None) -> None:
        with self._cond:
            self._budget.process_limit_bytes = limit

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
        return self._catalog

    @property
    def servable_ids(self) -> list[str]:
        """Models and ensembles this device serves."""
        return self._catalog.servable_ids

    def entry(self, model_id: str) -> ModelEntry:
        """The catalogue entry of ``model_id``; :class:`InvalidParams` naming the servable ones if unknown."""
        try:
            return self._catalog.models[model_id]
        except KeyError:
            known = ", ".join(self._catalog.servable_ids) or "none"
            raise InvalidParams(f"unknown model {model_id!r}; this device serves: {known}") from None

    def verify_all(self) -> dict[str, str]:
        """Check every model file's sha256; returns (and remembers) the refused ones with the reason."""
        with self._reload_lock:
            self._install(
                build_catalog(self.models_dir, read_manifest(self.models_dir, self.defaults_dir), complete=self._complete)
            )
        return dict(self._catalog.refused)

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
            previous = self._catalog.models
            self._install(build_catalog(self.models_dir, manifest, self._catalog, self._complete))
        for model_id, entry in previous.items():
            current = self._catalog.models.get(model_id)
            if current is None:
                self.on_event("model_removed", model=model_id, version=entry.version)
            elif current.version != entry.version or current.sha256 != entry.sha256:
                self.on_event("model_swapped", model=model_id, old=entry.version, new=current.version)
        for model_id in self._catalog.pinned_ids:
            try:
                with self.lease(model_id):
                    pass
            except RequestError as exc:
                log.error("pinned model %s cannot be kept loaded: %s", model_id, exc.message)
        return True

    def _install(self, catalog: Catalog) -> None:
        closed = False
        with self._cond:
            self._catalog = catalog
            # Files were just verified again; a load that failed before gets another chance.
            self._load_failures.clear()
            for model_id, slot in list(self._slots.serving.items()):
                if catalog.models.get(model_id) != slot.entry or model_id in catalog.refused:
                    closed |= self._budget.retire(slot, "replaced or removed")
            self._cond.notify_all()
        if closed:
            return_freed_memory()

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
        with self._cond:
            warmed = self._slots.warming.get(declared.id)
            if warmed is not None and warmed.loaded is not None and self._warmed_from.get(declared.id) == declared:
                return warmed.loaded
        entry = self._complete_from_file(declared)
        deadline = time.monotonic() + self.load_wait_s
        closed = False
        with self._cond:
            self._warmed_from[declared.id] = declared
            for other in list(self._slots.warming.values()):
                closed |= self._budget.retire(other, f"{entry.id} {entry.version} is warmed instead")
            while True:
                # The version serving now keeps serving while the new one loads: it is never unloaded for it.
                reserve, freed = self._budget.make_room_to_load(entry, keep=self._slots.serving.get(entry.id))
                closed |= freed
                if reserve is not None:
                    slot = ModelSlot(entry, reserved_bytes=reserve, last_used=time.monotonic())
                    self._slots.warming[entry.id] = slot
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(
                        f"no room within the model memory budget to load model {entry.id!r} {entry.version} beside "
                        "the version serving now and the models requests hold"
                    )
                self._cond.wait(remaining)
        if closed:
            return_freed_memory()
        loaded = self._load_into(slot).loaded
        assert loaded is not None
        return loaded

    def _complete(self, declared: ModelEntry) -> ModelEntry:
        """``declared`` checked against its (verified) file and completed; for the version warmed from the same
        entry, what the warm found, so that the swap does not read the file with the runtime again."""
        with self._cond:
            warmed = self._slots.warming.get(declared.id)
            if warmed is not None and self._warmed_from.get(declared.id) == declared:
                return warmed.entry
        return self._complete_from_file(declared)

    def discard_warm(self, model_id: str, declared: ModelEntry | None = None) -> None:
        """Unload the version of ``model_id`` warmed by :meth:`warm` (if any; with ``declared``, only if it was
        warmed from that entry): it will not be swapped in."""
        with self._cond:
            slot = self._slots.warming.get(model_id)
            if declared is not None and self._warmed_from.get(model_id) != declared:
                slot = None
            closed = slot is not None and self._budget.retire(slot, "warmed, but not activated")
            self._cond.notify_all()
        if closed:
            return_freed_memory()

    def load_pinned(self) -> None:
        """Load every pinned model (at start); one that cannot be served or does not fit is a :class:`ModelError`."""
        for model_id in self._catalog.pinned_ids:
            reason = self._catalog.refused.get(model_id)
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
        for entry in list(self._catalog.models.values()):
            if entry.id in self._catalog.refused or not self._loader.wants_accelerator(entry):
                continue
            try:
                with self.lease(entry.id):
                    pass
            except RequestError as exc:
                raise ModelError(f"model {entry.id!r} cannot be loaded on its accelerator: {exc.message}") from None

    def accelerator_report(self, entry: ModelEntry) -> dict[str, str | None]:
        """The accelerator ``entry`` asks for, the one it runs on (None until loaded) and why they differ."""
        return self._loader.accelerator_report(entry)

    def accelerators_in_use(self) -> dict[str, str]:
        """Each loaded model's accelerator, as the status and /metrics report it."""
        with self._cond:
            return {
                model_id: slot.loaded.accelerator_in_use
                for model_id, slot in self._slots.serving.items()
                if slot.loaded is not None
            }

    # ---- leases ----------------------------------------------------------------------------------

    @contextmanager
    def lease(self, model_id: str) -> Iterator[LoadedModel]:
        """The loaded model (loading it first if needed), kept loaded until the block ends."""
        slot = self._acquire(model_id)
        try:
            assert slot.loaded is not None
            yield slot.loaded
        finally:
            self._release(slot)

    def _acquire(self, model_id: str) -> ModelSlot:
        deadline = time.monotonic() + self.load_wait_s
        closed = False
        with self._cond:
            while True:
                entry = self.entry(model_id)
                reason = self._catalog.refused.get(model_id) or self._load_failures.get((model_id, entry.sha256))
                if reason is not None:
                    raise ModelUnavailable(reason)
                slot = self._slots.serving.get(model_id) or self._slots.adopt_warm(entry)
                if slot is not None and slot.loaded is not None:
                    slot.leases += 1
                    slot.last_used = time.monotonic()
                    return slot
                if slot is None:
                    reserve, closed = self._budget.make_room_to_load(entry)
                    if reserve is not None:
                        slot = ModelSlot(entry, reserved_bytes=reserve, leases=1, last_used=time.monotonic())
                        self._slots.serving[model_id] = slot
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(f"model {model_id!r} is waiting for memory held by models in use; retry later")
                self._cond.wait(remaining)
        if closed:
            return_freed_memory()
        return self._load_into(slot)

    def _load_into(self, slot: ModelSlot) -> ModelSlot:
        entry = slot.entry
        started = time.monotonic()
        try:
            loaded = self._loader.load(entry, partial(self._admits_growth, slot))
        except (ModelError, ModelUnavailable) as exc:
            message = exc.message if isinstance(exc, RequestError) else str(exc)
            log.error("model refused: %s", message)
            self.on_event("model_refused", model=entry.id, version=entry.version, reason=message)
            with self._cond:
                self._load_failures[(entry.id, entry.sha256)] = message
                self._drop(slot)
            raise ModelUnavailable(message) from None
        except BaseException:
            with self._cond:
                self._drop(slot)
            raise
        load_ms = (time.monotonic() - started) * 1000
        with self._cond:
            slot.loaded, slot.reserved_bytes = loaded, 0
            measured = loaded.memory_bytes
            self.measurements.record_load(entry.id, entry.sha256, measured, load_ms)
            refused: RequestError | None = self._budget.too_large(entry)
            # A version warmed beside the serving one never has that one unloaded to fit.
            beside = self._slots.serving.get(entry.id) if self._slots.warming.get(entry.id) is slot else None
            if refused is None:
                self._budget.evict_over_budget(slot, beside)
                if beside is not None and self._budget.over_budget():
                    refused = Overloaded(
                        f"model {entry.id!r} {entry.version} measured {measured / MB:.1f} MB: with the version "
                        f"serving now ({beside.memory_bytes / MB:.1f} MB) it does not fit in the model memory "
                        f"budget of {(self._budget.budget_bytes or 0) // MB} MB"
                    )
            if refused is not None:
                loaded.close()
                self._drop(slot)
        if refused is not None:
            return_freed_memory()
            raise refused
        log.info(
            "model %s %s loaded on %s in %.0f ms: %.1f MB measured (file %.1f MB, interpreter %.1f MB)",
            entry.id, entry.version, loaded.accelerator_in_use, load_ms, measured / MB, loaded.size_bytes / MB,
            loaded.interpreter_bytes / MB,
        )
        self.on_event("model_loaded", model=entry.id, version=entry.version, memory_mb=round(measured / MB, 1))
        return slot

    def _drop(self, slot: ModelSlot) -> None:
        """Forget a slot whose load failed (under the lock)."""
        self._slots.forget(slot)
        self._slots.draining.discard(slot)
        self._cond.notify_all()

    def _release(self, slot: ModelSlot) -> None:
        closed = False
        with self._cond:
            slot.leases -= 1
            slot.last_used = time.monotonic()
            if slot.retired and slot.leases == 0:
                self._slots.draining.discard(slot)
                if slot.loaded is not None:
                    slot.loaded.close()
                    closed = True
            elif self._budget.over_budget():
                closed = self._budget.evict_over_budget()
            self._cond.notify_all()
        if closed:
            return_freed_memory()

    def _admits_growth(self, slot: ModelSlot, estimated_bytes: int) -> bool:
        """Whether a model may create one more interpreter (asked by its pool, without the lock held)."""
        with self._cond:
            return self._budget.admits_growth(slot, estimated_bytes)

    # ---- memory pressure and measurements ---------------------------------------------------------

    def unload_idle(self) -> int:
        """Under memory pressure: unload every unpinned model no request holds, and spare interpreters."""
        with self._cond:
            unloaded = self._budget.unload_idle()
        return_freed_memory()
        return unloaded

    @property
    def memory_used_bytes(self) -> int:
        """Measured memory of every loaded (or still draining) model."""
        with self._cond:
            return self._slots.used_bytes()

    def runs_within(self, model_id: str, max_ms: float) -> bool:
        """Whether ``model_id`` is a loaded model (not an ensemble) whose runs average at most ``max_ms``."""
        with self._cond:
            slot = self._slots.serving.get(model_id)
            if slot is None or slot.loaded is None:
                return False
            entry = slot.entry
        latency = self.measurements.latency_ms(model_id, entry.sha256)
        return latency is not None and latency <= max_ms

    @property
    def loaded_ids(self) -> list[str]:
        """Models loaded now."""
        with self._cond:
            return [model_id for model_id, slot in self._slots.serving.items() if slot.loaded is not None]

    def stats(self, entry: ModelEntry) -> ModelStats:
        """Loaded or not, measured memory (live if loaded), latency average, load time, whether it can ever fit."""
        with self._cond:
            slot = self._slots.serving.get(entry.id)
            loaded = slot is not None and slot.loaded is not None and slot.entry == entry
            live = slot.memory_bytes if slot is not None and loaded else None
            fits = self._budget.too_large(entry) is None
        measurements = self.measurements
        memory = live if live is not None else measurements.memory_bytes(entry.id, entry.sha256)
        return ModelStats(
            loaded,
            memory,
            measurements.latency_ms(entry.id, entry.sha256),
            measurements.load_ms(entry.id, entry.sha256),
            fits,
        )

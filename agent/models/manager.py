"""Which models exist, which are loaded, and how much memory they may hold.

Memory accounting. A loaded model costs its file's bytes (held in memory, shared by all its interpreters)
plus each interpreter's measured growth: RSS and PSS are sampled around creating and allocating it, after
trimming the heap (:func:`agent.observe.memory.measured_growth`). A model has one interpreter per concurrent run,
up to ``max_concurrent_inferences``, each measured as it is created. The measured total is remembered per
model version, even after the model is unloaded, and is what the budget and the router use from then on.

Before a model's first load its cost is estimated at twice its file size (XNNPACK keeps a packed copy of
float weights per interpreter); its file size alone is a hard lower bound, so a file larger than the
budget is refused without being read. A model measured above the budget is unloaded and refused from then
on (:class:`ModelTooLarge`, naming both numbers).

Room for a load means room within the model budget and, with the anonymous resident memory measured at
that moment (:func:`~agent.observe.memory.anon_rss_bytes`: RSS without the file-backed library pages that
no unload can shrink), under the process soft limit: whatever else the process holds, a load never takes
it over. Making room unloads the
least recently used unpinned models that no request holds. Requests hold a model
through :meth:`ModelManager.lease`; a model that is unloaded or replaced while leased is closed only when
its last lease ends, so requests in flight finish on the interpreters they started with. Closing drops
every interpreter, then the heap is trimmed so the memory really goes back to the kernel.

The catalogue (:class:`agent.models.catalog.Catalog`) is swapped whole when the manifest changes
(:meth:`ModelManager.reload`): a request resolves its model once, so it sees the old version or the new
one, never a mix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from agent.config import BUNDLED_MODELS_DIR, AcceleratorChoice, InferenceSettings, Limits, RuntimeChoice
from agent.errors import (
    InvalidParams,
    ModelError,
    ModelTooLarge,
    ModelUnavailable,
    Overloaded,
    RequestError,
)
from agent.models.catalog import (
    Catalog,
    Manifest,
    ModelEntry,
    build_catalog,
    load_manifest,
    overlay_manifest,
    verified_model_bytes,
)
from agent.models.accelerators import CPU, accelerator_for, load_runtime
from agent.models.inference import LoadedModel
from agent.models.modelfile import complete_from_file
from agent.models.stats import Measurements, ModelStats
from agent.observe.memory import MB, anon_rss_bytes, return_freed_memory, trim_heap

log = logging.getLogger(__name__)

LOAD_WAIT_S = 30.0
# Before a model has been measured: its bytes plus one interpreter that may repack all of its weights.
UNMEASURED_COST_FACTOR = 2


@dataclass(eq=False)
class _Slot:
    """One version of one model while it is loading, loaded, or draining its last requests."""

    entry: ModelEntry
    loaded: LoadedModel | None = None
    reserved_bytes: int = 0
    leases: int = 0
    last_used: float = 0.0
    retired: bool = False

    @property
    def memory_bytes(self) -> int:
        return self.loaded.memory_bytes if self.loaded is not None else self.reserved_bytes


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
    ) -> None:
        self.models_dir = models_dir
        self.defaults_dir = defaults_dir
        self.runtime = load_runtime(runtime)
        self.default_accelerator: AcceleratorChoice = accelerator
        self.accelerator_required = accelerator_required
        self.num_threads = num_threads
        self.max_concurrent_inferences = max_concurrent_inferences
        self.budget_bytes = memory_budget_mb * MB if memory_budget_mb is not None else None
        self.process_limit_bytes = process_limit_mb * MB if process_limit_mb is not None else None
        self.load_wait_s = load_wait_s
        # Verifying an entry also checks it against its file and fills in what it leaves out.
        self._complete = partial(complete_from_file, models_dir, self.runtime)
        manifest = self._read_manifest()
        self._catalog = Catalog(
            {entry.id: entry for entry in manifest.models}, {e.id: e for e in manifest.ensembles}, {}, {}
        )
        self._gate = threading.BoundedSemaphore(max_concurrent_inferences)
        self._cond = threading.Condition()
        self._reload_lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._draining: set[_Slot] = set()
        self._load_failures: dict[tuple[str, str], str] = {}
        # Per model version: the accelerator it last loaded on and, after a fallback, why not the one it asked
        # for. A version whose accelerator failed once loads on CPU from then on: said once, not retried.
        self._accelerators: dict[tuple[str, str], tuple[str, str | None]] = {}
        # Told of every load, unload, refusal and version swap, e.g. for metrics and the audit trail; it is
        # called with the manager's lock held at times, so it must only hand the event on.
        self.on_event: Callable[..., None] = lambda kind, **detail: None
        self.measurements = Measurements()

    @classmethod
    def for_limits(
        cls, models_dir: Path | None, limits: Limits, inference: InferenceSettings | None = None
    ) -> ModelManager:
        """The bundled models overlaid by ``models_dir``'s (if set), with the threads, concurrency, model memory
        budget and process soft limit of ``limits`` and the runtime and accelerators of ``inference``."""
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
        )

    # ---- the catalogue ---------------------------------------------------------------------------

    def _read_manifest(self) -> Manifest:
        if self.defaults_dir is None:
            return load_manifest(self.models_dir)
        return overlay_manifest(self.defaults_dir, self.models_dir)

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    @property
    def servable_ids(self) -> list[str]:
        return self._catalog.servable_ids

    def entry(self, model_id: str) -> ModelEntry:
        try:
            return self._catalog.models[model_id]
        except KeyError:
            known = ", ".join(self._catalog.servable_ids) or "none"
            raise InvalidParams(f"unknown model {model_id!r}; this device serves: {known}") from None

    def verify_all(self) -> dict[str, str]:
        """Check every model file's sha256; returns (and remembers) the refused ones with the reason."""
        with self._reload_lock:
            self._install(build_catalog(self.models_dir, self._read_manifest(), complete=self._complete))
        return dict(self._catalog.refused)

    def reload(self) -> bool:
        """Re-read the manifest and swap in what changed; False (old catalogue kept) if it is unusable.

        Models whose entry or file changed are verified again; a new version with a bad file is refused
        and the old one keeps serving. Replaced and removed models are unloaded once their requests in
        flight are done. Pinned models of the new catalogue are loaded.
        """
        with self._reload_lock:
            try:
                manifest = self._read_manifest()
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
        for model_id in self._pinned_ids():
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
            for model_id, slot in list(self._slots.items()):
                if catalog.models.get(model_id) != slot.entry or model_id in catalog.refused:
                    closed |= self._retire(slot, "replaced or removed")
            self._cond.notify_all()
        if closed:
            return_freed_memory()

    def _pinned_ids(self) -> list[str]:
        catalog = self._catalog
        return [entry.id for entry in catalog.models.values() if entry.pinned]

    def load_pinned(self) -> None:
        """Load every pinned model (at start); one that cannot be served or does not fit is a :class:`ModelError`."""
        for model_id in self._pinned_ids():
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
            if entry.id in self._catalog.refused or accelerator_for(entry, self.default_accelerator) == CPU:
                continue
            try:
                with self.lease(entry.id):
                    pass
            except RequestError as exc:
                raise ModelError(f"model {entry.id!r} cannot be loaded on its accelerator: {exc.message}") from None

    def accelerator_report(self, entry: ModelEntry) -> dict[str, str | None]:
        """The accelerator ``entry`` asks for, the one it runs on (None until loaded) and why they differ."""
        with self._cond:
            in_use, problem = self._accelerators.get((entry.id, entry.sha256), (None, None))
        return {"requested": accelerator_for(entry, self.default_accelerator).name, "in_use": in_use, "fallback_reason": problem}

    def accelerators_in_use(self) -> dict[str, str]:
        """Each loaded model's accelerator, as the status and /metrics report it."""
        with self._cond:
            return {
                model_id: slot.loaded.accelerator_in_use for model_id, slot in self._slots.items() if slot.loaded is not None
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

    def _acquire(self, model_id: str) -> _Slot:
        deadline = time.monotonic() + self.load_wait_s
        closed = False
        with self._cond:
            while True:
                entry = self.entry(model_id)
                reason = self._catalog.refused.get(model_id) or self._load_failures.get((model_id, entry.sha256))
                if reason is not None:
                    raise ModelUnavailable(reason)
                slot = self._slots.get(model_id)
                if slot is not None and slot.loaded is not None:
                    slot.leases += 1
                    slot.last_used = time.monotonic()
                    return slot
                if slot is None:
                    reserve, closed = self._make_room_to_load(entry)
                    if reserve is not None:
                        slot = _Slot(entry, reserved_bytes=reserve, leases=1, last_used=time.monotonic())
                        self._slots[model_id] = slot
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(f"model {model_id!r} is waiting for memory held by models in use; retry later")
                self._cond.wait(remaining)
        if closed:
            return_freed_memory()
        return self._load_into(slot)

    def _load_into(self, slot: _Slot) -> _Slot:
        entry = slot.entry
        started = time.monotonic()
        try:
            content = verified_model_bytes(self.models_dir, entry)
            with self._cond:
                _, known_problem = self._accelerators.get((entry.id, entry.sha256), (None, None))
            accelerator = CPU if known_problem is not None else accelerator_for(entry, self.default_accelerator)
            loaded = LoadedModel(
                entry,
                content,
                self.num_threads,
                runtime=self.runtime,
                max_interpreters=self.max_concurrent_inferences,
                admit_growth=partial(self._admit_growth, slot),
                gate=self._gate,
                accelerator=accelerator,
                accelerator_required=self.accelerator_required,
            )
            if loaded.accelerator_problem is not None:
                log.warning("model %s %s runs on CPU instead: %s", entry.id, entry.version, loaded.accelerator_problem)
            with self._cond:
                self._accelerators[(entry.id, entry.sha256)] = (loaded.accelerator_in_use, known_problem or loaded.accelerator_problem)
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
            too_large = self._too_large(entry)
            if too_large is None:
                self._evict_over_budget(keep=slot)
            else:
                loaded.close()
                self._drop(slot)
        if too_large is not None:
            return_freed_memory()
            raise too_large
        log.info(
            "model %s %s loaded on %s in %.0f ms: %.1f MB measured (file %.1f MB, interpreter %.1f MB)",
            entry.id, entry.version, loaded.accelerator_in_use, load_ms, measured / MB, loaded.size_bytes / MB,
            loaded.interpreter_bytes / MB,
        )
        self.on_event("model_loaded", model=entry.id, version=entry.version, memory_mb=round(measured / MB, 1))
        return slot

    def _drop(self, slot: _Slot) -> None:
        """Forget a slot whose load failed (under the lock)."""
        if self._slots.get(slot.entry.id) is slot:
            del self._slots[slot.entry.id]
        self._draining.discard(slot)
        self._cond.notify_all()

    def _release(self, slot: _Slot) -> None:
        closed = False
        with self._cond:
            slot.leases -= 1
            slot.last_used = time.monotonic()
            if slot.retired and slot.leases == 0:
                self._draining.discard(slot)
                if slot.loaded is not None:
                    slot.loaded.close()
                    closed = True
            elif self.budget_bytes is not None and self._used_bytes() > self.budget_bytes:
                closed = self._evict_over_budget()
            self._cond.notify_all()
        if closed:
            return_freed_memory()

    # ---- the budget (every method below runs under self._cond) ------------------------------------

    def _used_bytes(self) -> int:
        return sum(slot.memory_bytes for slot in self._slots.values()) + sum(
            slot.memory_bytes for slot in self._draining
        )

    def _pinned_bytes(self, excluding: str) -> int:
        return sum(
            slot.memory_bytes for model_id, slot in self._slots.items() if slot.entry.pinned and model_id != excluding
        )

    def _needs(self, entry: ModelEntry) -> tuple[int, str]:
        """The best known cost of a model: measured, else its file size (a lower bound)."""
        measured = self.measurements.memory_bytes(entry.id, entry.sha256)
        if measured is not None:
            return measured, "measured"
        stamp = self._catalog.stamps.get(entry.id)
        if stamp is not None:
            return stamp.size, "its file alone"
        try:
            return (self.models_dir / entry.file).stat().st_size, "its file alone"
        except OSError:
            return 0, "unknown"

    def _too_large(self, entry: ModelEntry) -> ModelTooLarge | None:
        """The error for a model that can never fit beside the pinned models, or None."""
        if self.budget_bytes is None:
            return None
        needs, how = self._needs(entry)
        pinned = self._pinned_bytes(excluding=entry.id)
        if needs <= self.budget_bytes - pinned:
            return None
        budget_mb = self.budget_bytes // MB
        message = f"model {entry.id!r} needs {needs / MB:.1f} MB ({how}), more than the model memory budget of {budget_mb} MB"
        if pinned:
            message += f" less the {pinned / MB:.1f} MB held by pinned models"
        data = {"model": entry.id, "needs_mb": round(needs / MB, 1), "budget_mb": budget_mb, "pinned_mb": round(pinned / MB, 1)}
        return ModelTooLarge(message, data)

    def _idle_unpinned(self, keep: _Slot | None = None) -> list[_Slot]:
        """Slots that may be unloaded, least recently used first."""
        idle = [
            slot
            for slot in self._slots.values()
            if slot is not keep and not slot.entry.pinned and slot.leases == 0 and slot.loaded is not None
        ]
        return sorted(idle, key=lambda slot: slot.last_used)

    def _make_room_to_load(self, entry: ModelEntry) -> tuple[int | None, bool]:
        """Unload idle models to make room for loading ``entry``: (bytes to reserve, whether any was closed).

        Room means both within the model budget and, measured now, under the process soft limit (so a
        load never pushes the process over it, whatever else the process holds). The reservation is None
        when even unloading every idle model would not make room: models that requests hold must be
        released first (the caller waits), and nothing is unloaded meanwhile. When the process soft limit
        alone refuses while idle models are loaded, those are unloaded and the memory measured again before
        refusing (:class:`Overloaded`): measured model costs are estimates, the kernel's figure is not.
        """
        too_large = self._too_large(entry)
        if too_large is not None:
            raise too_large
        measured = self.measurements.memory_bytes(entry.id, entry.sha256)
        estimate = measured if measured is not None else self._needs(entry)[0] * UNMEASURED_COST_FACTOR
        frees = []
        if self.budget_bytes is not None:
            estimate = min(estimate, self.budget_bytes - self._pinned_bytes(excluding=entry.id))
            frees.append(self.budget_bytes - self._used_bytes())
        if self.process_limit_bytes is not None:
            process_free = self._process_free()
            unpinned = sum(slot.memory_bytes for slot in [*self._slots.values(), *self._draining] if not slot.entry.pinned)
            idle = self._idle_unpinned()
            if process_free + unpinned < estimate and idle:
                # Measured costs can under-count what an unload gives back (allocator slack, interpreter
                # arenas): unload the idle models and measure again rather than refuse with them loaded.
                for slot in idle:
                    self._retire(slot, f"to make room for {entry.id}")
                return_freed_memory()
                process_free = self._process_free()
                unpinned = sum(slot.memory_bytes for slot in [*self._slots.values(), *self._draining] if not slot.entry.pinned)
            if process_free + unpinned < estimate:
                raise Overloaded(
                    f"the agent holds {(self.process_limit_bytes - process_free) / MB:.0f} MB: loading model "
                    f"{entry.id!r} (about {estimate / MB:.1f} MB) would take it over its soft limit of "
                    f"{self.process_limit_bytes // MB} MB; retry later"
                )
            frees.append(process_free)
        if not frees:
            return 0, False
        free = min(frees)
        idle = self._idle_unpinned()
        if free + sum(slot.memory_bytes for slot in idle) < estimate:
            return None, False
        closed = False
        for slot in idle:
            if free >= estimate:
                break
            free += slot.memory_bytes
            closed |= self._retire(slot, f"to make room for {entry.id}")
        return estimate, closed

    def _process_free(self) -> int:
        """Room under the process soft limit, by the anonymous resident memory (see :mod:`agent.observe.memory`)."""
        assert self.process_limit_bytes is not None
        trim_heap()
        # Models other requests are loading right now have reserved memory that RSS does not show yet.
        loading = sum(slot.reserved_bytes for slot in self._slots.values() if slot.loaded is None)
        return self.process_limit_bytes - anon_rss_bytes() - loading

    def _evict_over_budget(self, keep: _Slot | None = None) -> bool:
        """Unload idle models until the measured total is back within budget; True if any was closed."""
        closed = False
        if self.budget_bytes is None:
            return closed
        for slot in self._idle_unpinned(keep):
            if self._used_bytes() <= self.budget_bytes:
                break
            closed |= self._retire(slot, "to stay within the model memory budget")
        return closed

    def _retire(self, slot: _Slot, why: str) -> bool:
        """Take a slot out of service; closes it now if no request holds it (returns True), else at release."""
        if self._slots.get(slot.entry.id) is slot:
            del self._slots[slot.entry.id]
        slot.retired = True
        log.info("unloading model %s %s (%.1f MB) %s", slot.entry.id, slot.entry.version, slot.memory_bytes / MB, why)
        self.on_event("model_unloaded", model=slot.entry.id, version=slot.entry.version, reason=why)
        if slot.leases or slot.loaded is None:
            self._draining.add(slot)
            return False
        slot.loaded.close()
        return True

    def _admit_growth(self, slot: _Slot, estimated_bytes: int) -> bool:
        """Whether a model may create one more interpreter; never unloads anything to allow it."""
        with self._cond:
            if slot.retired:
                return False
            if self.process_limit_bytes is not None and anon_rss_bytes() + estimated_bytes > self.process_limit_bytes:
                return False
            return self.budget_bytes is None or self._used_bytes() + estimated_bytes <= self.budget_bytes

    # ---- memory pressure and measurements ---------------------------------------------------------

    def unload_idle(self) -> int:
        """Under memory pressure: unload every unpinned model no request holds, and spare interpreters."""
        with self._cond:
            idle = self._idle_unpinned()
            for slot in idle:
                self._retire(slot, "because the process is over its memory soft limit")
            for slot in self._slots.values():
                if slot.loaded is not None:
                    slot.loaded.shrink(keep=1)
        return_freed_memory()
        return len(idle)

    @property
    def memory_used_bytes(self) -> int:
        """Measured memory of every loaded (or still draining) model."""
        with self._cond:
            return self._used_bytes()

    def runs_within(self, model_id: str, max_ms: float) -> bool:
        """Whether ``model_id`` is a loaded model (not an ensemble) whose runs average at most ``max_ms``."""
        with self._cond:
            slot = self._slots.get(model_id)
            if slot is None or slot.loaded is None:
                return False
            entry = slot.entry
        latency = self.measurements.latency_ms(model_id, entry.sha256)
        return latency is not None and latency <= max_ms

    @property
    def loaded_ids(self) -> list[str]:
        with self._cond:
            return [model_id for model_id, slot in self._slots.items() if slot.loaded is not None]

    def stats(self, entry: ModelEntry) -> ModelStats:
        """Loaded or not, measured memory (live if loaded), latency average, load time, whether it can ever fit."""
        with self._cond:
            slot = self._slots.get(entry.id)
            loaded = slot is not None and slot.loaded is not None and slot.entry == entry
            live = slot.memory_bytes if slot is not None and loaded else None
            fits = self._too_large(entry) is None
        measurements = self.measurements
        memory = live if live is not None else measurements.memory_bytes(entry.id, entry.sha256)
        return ModelStats(
            loaded,
            memory,
            measurements.latency_ms(entry.id, entry.sha256),
            measurements.load_ms(entry.id, entry.sha256),
            fits,
        )

"""Which models are loaded, and which requests hold them: the model slots within the memory budget.

A loaded model stays within the model memory budget and the process soft limit
(:class:`agent.models.budget.MemoryBudget`, which also says how a model's cost is measured). Requests hold a
model through :meth:`LoadedModels.lease`; a model that is unloaded or replaced while leased is closed only when
its last lease ends, so requests in flight finish on the interpreters they started with. Closing drops
every interpreter, then the heap is trimmed so the memory really goes back to the kernel.

The catalogue in service is kept here too, swapped whole (:meth:`LoadedModels.install`) under the same lock as
the slots: a load never starts for an entry the swap already retired. One lock (a condition, so a load can
wait for memory that leased models hold) guards the catalogue, the slot table, the budget, the load failures
and the warmed versions; nothing waits on another thread while holding it. The model manager
(:mod:`agent.models.manager`) reads the manifest and decides what to install and warm.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from agent.errors import InvalidParams, ModelError, ModelUnavailable, Overloaded, RequestError
from agent.models.budget import Lease, MemoryBudget, ModelSlot, SlotTable
from agent.models.catalog import Catalog, ModelEntry
from agent.models.inference import LoadedModel
from agent.models.loader import ModelLoader
from agent.models.stats import Measurements, ModelStats
from agent.observe.memory import MB, return_freed_memory

log = logging.getLogger(__name__)


class LoadedModels:
    """The catalogue in service, its loaded models and their leases, safe to use from every worker thread.

    ``on_event`` is told of every load, unload, refusal and version swap; it is called with the lock held at
    times, so it must only hand the event on."""

    def __init__(
        self,
        models_dir: Path,
        catalog: Catalog,
        loader: ModelLoader,
        *,
        memory_budget_mb: int | None,
        process_limit_mb: int | None,
        load_wait_s: float,
        on_event: Callable[..., None],
    ) -> None:
        self.load_wait_s = load_wait_s
        self.on_event = on_event
        self.budget_bytes = memory_budget_mb * MB if memory_budget_mb is not None else None  # None: unbounded
        self.measurements = Measurements()
        self._catalog = catalog
        self._loader = loader
        self._cond = threading.Condition()
        self._slots = SlotTable()
        self._load_failures: dict[tuple[str, str], str] = {}
        self._warmed_from: dict[str, ModelEntry] = {}  # model id -> the declared entry of the version warmed
        self._budget = MemoryBudget(
            self._slots,
            budget_bytes=self.budget_bytes,
            process_limit_bytes=process_limit_mb * MB if process_limit_mb is not None else None,
            measurements=self.measurements,
            file_size=lambda entry: self._catalog.file_size(models_dir, entry),
            on_event=on_event,
        )

    def process_limit(self) -> int | None:
        """The process soft limit a load must stay under (None: none)."""
        return self._budget.process_limit_bytes

    def set_process_limit(self, limit: int | None) -> None:
        """Hold loads under ``limit`` bytes of process memory from now on (None: no limit)."""
        with self._cond:
            self._budget.process_limit_bytes = limit

    # ---- the catalogue in service ----------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        """The catalogue in service now (swapped whole by :meth:`install`)."""
        return self._catalog

    def entry(self, model_id: str) -> ModelEntry:
        """The catalogue entry of ``model_id``; :class:`InvalidParams` naming the servable ones if unknown."""
        try:
            return self._catalog.models[model_id]
        except KeyError:
            known = ", ".join(self._catalog.servable_ids) or "none"
            raise InvalidParams(f"unknown model {model_id!r}; this device serves: {known}") from None

    def install(self, catalog: Catalog) -> None:
        """Serve ``catalog`` from now on: loaded models whose entry changed or was refused are unloaded once their
        requests in flight are done, and loads that failed get another chance."""
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

    # ---- versions warmed beside the serving one ---------------------------------------------------

    def warmed(self, declared: ModelEntry) -> tuple[ModelEntry, LoadedModel | None] | None:
        """The completed entry of the version warmed from ``declared`` and its model (None while it loads); None if
        no version of that model was warmed from that entry."""
        with self._cond:
            slot = self._slots.warming.get(declared.id)
            if slot is None or self._warmed_from.get(declared.id) != declared:
                return None
            return slot.entry, slot.loaded

    def warm(self, declared: ModelEntry, entry: ModelEntry) -> LoadedModel:
        """Load ``entry`` (``declared`` completed from its file) beside the version serving now, within the budget
        (idle models may be unloaded to make room, never the serving version), replacing any other version
        warmed. It stays loaded, outside the catalogue, until the first lease of the same entry from an installed
        catalogue adopts it, or :meth:`discard_warm`. Raises :class:`Overloaded` (no room made within
        ``load_wait_s``), :class:`~agent.errors.ModelTooLarge` or :class:`ModelUnavailable`."""
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

    # ---- leases ----------------------------------------------------------------------------------

    def lease(self, model_id: str) -> Lease:
        """The loaded model (loading it first if needed), kept loaded until the block ends."""
        return Lease(self._acquire, self._release, model_id)

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

    def accelerators_in_use(self) -> dict[str, str]:
        """Each loaded model's accelerator, as the status and /metrics report it."""
        with self._cond:
            return {
                model_id: slot.loaded.accelerator_in_use
                for model_id, slot in self._slots.serving.items()
                if slot.loaded is not None
            }

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

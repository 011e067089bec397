"""How much memory the loaded models may hold, and which idle ones to unload to stay within it.

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
it over. Making room unloads the least recently used unpinned models that no request holds.

Nothing here takes a lock: the loaded models (:class:`agent.models.residency.LoadedModels`) own the one lock that
guards the :class:`SlotTable` and call every :class:`MemoryBudget` method with it held.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.errors import ModelTooLarge, Overloaded
from agent.models.catalog import ModelEntry
from agent.models.inference import LoadedModel
from agent.models.stats import Measurements
from agent.observe.memory import MB, anon_rss_bytes, return_freed_memory, trim_heap

log = logging.getLogger(__name__)

# Before a model has been measured: its bytes plus one interpreter that may repack all of its weights.
UNMEASURED_COST_FACTOR = 2


@dataclass(eq=False)
class ModelSlot:
    """One version of one model while it is loading, loaded, or draining its last requests."""

    entry: ModelEntry
    loaded: LoadedModel | None = None
    reserved_bytes: int = 0
    leases: int = 0
    last_used: float = 0.0
    retired: bool = False

    @property
    def memory_bytes(self) -> int:
        """Measured memory once loaded; until then, what its load reserved."""
        return self.loaded.memory_bytes if self.loaded is not None else self.reserved_bytes


class Lease:
    """The context manager of ``ModelManager.lease``: the slot's loaded model, held from entry until exit.

    A class, because a generator-based context manager costs ~0.5 us more, once per inference.
    """

    __slots__ = ("_acquire", "_release", "_model_id", "_slot")

    def __init__(
        self, acquire: Callable[[str], ModelSlot], release: Callable[[ModelSlot], None], model_id: str
    ) -> None:
        self._acquire = acquire
        self._release = release
        self._model_id = model_id

    def __enter__(self) -> LoadedModel:
        slot = self._slot = self._acquire(self._model_id)
        if slot.loaded is None:  # acquiring returns only loaded slots; never held past a broken promise
            self._release(slot)
            raise AssertionError(f"model {self._model_id!r} was leased without being loaded")
        return slot.loaded

    def __exit__(self, *exc_info: object) -> None:
        self._release(self._slot)


@dataclass
class SlotTable:
    """The model versions in memory: the one serving each model id, retired ones requests still hold, and new
    versions warmed beside the serving ones until the catalogue names them (a deployment's activation)."""

    serving: dict[str, ModelSlot] = field(default_factory=dict)
    draining: set[ModelSlot] = field(default_factory=set)
    warming: dict[str, ModelSlot] = field(default_factory=dict)

    def forget(self, slot: ModelSlot) -> None:
        """Stop serving (or warming) ``slot``; it may still be draining."""
        if self.serving.get(slot.entry.id) is slot:
            del self.serving[slot.entry.id]
        if self.warming.get(slot.entry.id) is slot:
            del self.warming[slot.entry.id]

    def adopt_warm(self, entry: ModelEntry) -> ModelSlot | None:
        """The version warmed for ``entry``, now serving it; None if none was warmed (or it is still loading)."""
        slot = self.warming.get(entry.id)
        if slot is None or slot.entry != entry or slot.loaded is None:
            return None
        del self.warming[entry.id]
        self.serving[entry.id] = slot
        return slot

    def used_bytes(self) -> int:
        """Memory of every slot, serving, draining or warming."""
        return sum(slot.memory_bytes for slot in [*self.serving.values(), *self.draining, *self.warming.values()])

    def pinned_bytes(self, excluding: str) -> int:
        """Memory of the pinned models serving, but for ``excluding``'s."""
        return sum(
            slot.memory_bytes for model_id, slot in self.serving.items() if slot.entry.pinned and model_id != excluding
        )

    def unpinned_bytes(self) -> int:
        """Memory of every unpinned slot, serving or draining: what unloading could ever give back."""
        return sum(slot.memory_bytes for slot in [*self.serving.values(), *self.draining] if not slot.entry.pinned)

    def idle_unpinned(self, *keep: ModelSlot | None) -> list[ModelSlot]:
        """Slots that may be unloaded (but for ``keep``), least recently used first."""
        idle = [
            slot
            for slot in self.serving.values()
            if slot not in keep and not slot.entry.pinned and slot.leases == 0 and slot.loaded is not None
        ]
        return sorted(idle, key=lambda slot: slot.last_used)


class MemoryBudget:
    """The model memory budget and process soft limit over a :class:`SlotTable`; call with its owner's lock held."""

    def __init__(
        self,
        slots: SlotTable,
        *,
        budget_bytes: int | None,
        process_limit_bytes: int | None,
        measurements: Measurements,
        file_size: Callable[[ModelEntry], int | None],
        on_event: Callable[..., None],
    ) -> None:
        self.slots = slots
        self.budget_bytes = budget_bytes
        self.process_limit_bytes = process_limit_bytes
        self.measurements = measurements
        # The size of a model's file as last verified, else on disk now; None if it cannot be read.
        self.file_size = file_size
        self.on_event = on_event

    def needs(self, entry: ModelEntry) -> tuple[int, str]:
        """The best known cost of a model: measured, else its file size (a lower bound)."""
        measured = self.measurements.memory_bytes(entry.id, entry.sha256)
        if measured is not None:
            return measured, "measured"
        size = self.file_size(entry)
        if size is None:
            return 0, "unknown"
        return size, "its file alone"

    def too_large(self, entry: ModelEntry) -> ModelTooLarge | None:
        """The error for a model that can never fit beside the pinned models, or None."""
        if self.budget_bytes is None:
            return None
        needs, how = self.needs(entry)
        pinned = self.slots.pinned_bytes(excluding=entry.id)
        if needs <= self.budget_bytes - pinned:
            return None
        budget_mb = self.budget_bytes // MB
        message = f"model {entry.id!r} needs {needs / MB:.1f} MB ({how}), more than the model memory budget of {budget_mb} MB"
        if pinned:
            message += f" less the {pinned / MB:.1f} MB held by pinned models"
        data = {"model": entry.id, "needs_mb": round(needs / MB, 1), "budget_mb": budget_mb, "pinned_mb": round(pinned / MB, 1)}
        return ModelTooLarge(message, data)

    def over_budget(self) -> bool:
        """Whether the models hold more than the model memory budget."""
        return self.budget_bytes is not None and self.slots.used_bytes() > self.budget_bytes

    def make_room_to_load(self, entry: ModelEntry, keep: ModelSlot | None = None) -> tuple[int | None, bool]:
        """Unload idle models (never ``keep``) to make room for loading ``entry``: (bytes to reserve, whether any
        was closed).

        Room means both within the model budget and, measured now, under the process soft limit (so a
        load never pushes the process over it, whatever else the process holds). The reservation is None
        when even unloading every idle model would not make room: models that requests hold must be
        released first (the caller waits), and nothing is unloaded meanwhile. When the process soft limit
        alone refuses while idle models are loaded, those are unloaded and the memory measured again before
        refusing (:class:`Overloaded`): measured model costs are estimates, the kernel's figure is not.
        """
        too_large = self.too_large(entry)
        if too_large is not None:
            raise too_large
        measured = self.measurements.memory_bytes(entry.id, entry.sha256)
        estimate = measured if measured is not None else self.needs(entry)[0] * UNMEASURED_COST_FACTOR
        frees = []
        if self.budget_bytes is not None:
            estimate = min(estimate, self.budget_bytes - self.slots.pinned_bytes(excluding=entry.id))
            frees.append(self.budget_bytes - self.slots.used_bytes())
        if self.process_limit_bytes is not None:
            process_free = self.process_free()
            unpinned = self.slots.unpinned_bytes()
            idle = self.slots.idle_unpinned(keep)
            if process_free + unpinned < estimate and idle:
                # Measured costs can under-count what an unload gives back (allocator slack, interpreter
                # arenas): unload the idle models and measure again rather than refuse with them loaded.
                for slot in idle:
                    self.retire(slot, f"to make room for {entry.id}")
                return_freed_memory()
                process_free = self.process_free()
                unpinned = self.slots.unpinned_bytes()
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
        idle = self.slots.idle_unpinned(keep)
        if free + sum(slot.memory_bytes for slot in idle) < estimate:
            return None, False
        closed = False
        for slot in idle:
            if free >= estimate:
                break
            free += slot.memory_bytes
            closed |= self.retire(slot, f"to make room for {entry.id}")
        return estimate, closed

    def process_free(self) -> int:
        """Room under the process soft limit, by the anonymous resident memory (see :mod:`agent.observe.memory`)."""
        assert self.process_limit_bytes is not None
        trim_heap()
        # Models other requests are loading right now have reserved memory that RSS does not show yet.
        loading = sum(slot.reserved_bytes for slot in self.slots.serving.values() if slot.loaded is None)
        return self.process_limit_bytes - anon_rss_bytes() - loading

    def evict_over_budget(self, *keep: ModelSlot | None) -> bool:
        """Unload idle models (but for ``keep``) until the measured total is back within budget; True if any was
        closed."""
        closed = False
        if self.budget_bytes is None:
            return closed
        for slot in self.slots.idle_unpinned(*keep):
            if self.slots.used_bytes() <= self.budget_bytes:
                break
            closed |= self.retire(slot, "to stay within the model memory budget")
        return closed

    def retire(self, slot: ModelSlot, why: str) -> bool:
        """Take a slot out of service; closes it now if no request holds it (returns True), else at release."""
        self.slots.forget(slot)
        slot.retired = True
        log.info("unloading model %s %s (%.1f MB) %s", slot.entry.id, slot.entry.version, slot.memory_bytes / MB, why)
        self.on_event("model_unloaded", model=slot.entry.id, version=slot.entry.version, reason=why)
        if slot.leases or slot.loaded is None:
            self.slots.draining.add(slot)
            return False
        slot.loaded.close()
        return True

    def admits_growth(self, slot: ModelSlot, estimated_bytes: int) -> bool:
        """Whether a model may create one more interpreter; never unloads anything to allow it."""
        if slot.retired:
            return False
        if self.process_limit_bytes is not None and anon_rss_bytes() + estimated_bytes > self.process_limit_bytes:
            return False
        return self.budget_bytes is None or self.slots.used_bytes() + estimated_bytes <= self.budget_bytes

    def unload_idle(self) -> int:
        """Unload every unpinned model no request holds and drop spare interpreters; how many were unloaded.

        The caller returns the freed memory to the kernel once it has let go of the lock.
        """
        idle = self.slots.idle_unpinned()
        for slot in idle:
            self.retire(slot, "because the process is over its memory soft limit")
        for slot in self.slots.serving.values():
            if slot.loaded is not None:
                slot.loaded.shrink(keep=1)
        return len(idle)

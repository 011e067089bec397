"""Turning a verified manifest entry into a loaded model: its file read and checked (its sha256, then the probe:
:mod:`agent.models.probe`), its accelerator chosen, and how each version fared on its accelerator remembered
(for ``models/list`` and the next load)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from agent.config import AcceleratorChoice
from agent.models.accelerators import CPU, AcceleratorHistory, accelerator_for
from agent.models.catalog import ModelEntry, verified_model_bytes
from agent.models.gate import FairGate
from agent.models.inference import LoadedModel
from agent.models.probe import ModelProbe

log = logging.getLogger(__name__)


class ModelLoader:
    """Builds the :class:`LoadedModel` of an entry; owned by the model manager, which decides when and where."""

    def __init__(
        self,
        models_dir: Path,
        probe: ModelProbe,
        *,
        num_threads: int,
        gate: FairGate,
        max_interpreters: int,
        default_accelerator: AcceleratorChoice,
        accelerator_required: bool,
    ) -> None:
        self.models_dir = models_dir
        self.probe = probe
        self.num_threads = num_threads
        self.default_accelerator: AcceleratorChoice = default_accelerator
        self.accelerator_required = accelerator_required
        self._gate = gate
        self._max_interpreters = max_interpreters
        self._history = AcceleratorHistory()

    def load(self, entry: ModelEntry, admit_growth: Callable[[int], bool]) -> LoadedModel:
        """The model of ``entry`` loaded on its accelerator (or CPU, saying why); raises
        :class:`~agent.errors.ModelError` if its file fails verification or the probe and
        :class:`~agent.errors.ModelUnavailable` if the runtime cannot load it."""
        content = verified_model_bytes(self.models_dir, entry)
        # Completing the entry probed this content already (the verdict is cached): this guards any other way in.
        self.probe.check(content, entry.file, entry.sha256)
        accelerator, known_problem = self._history.choose(entry, self.default_accelerator)
        loaded = LoadedModel(
            entry,
            content,
            self.num_threads,
            runtime=self.probe.runtime,
            max_interpreters=self._max_interpreters,
            admit_growth=admit_growth,
            gate=self._gate,
            accelerator=accelerator,
            accelerator_required=self.accelerator_required,
        )
        if loaded.accelerator_problem is not None:
            log.warning("model %s %s runs on CPU instead: %s", entry.id, entry.version, loaded.accelerator_problem)
        self._history.record(entry, loaded.accelerator_in_use, known_problem or loaded.accelerator_problem)
        return loaded

    def wants_accelerator(self, entry: ModelEntry) -> bool:
        """Whether ``entry`` (or the default) asks for something other than the CPU."""
        return accelerator_for(entry, self.default_accelerator) != CPU

    def accelerator_report(self, entry: ModelEntry) -> dict[str, str | None]:
        """The accelerator ``entry`` asks for, the one it runs on (None until loaded) and why they differ."""
        return self._history.report(entry, self.default_accelerator)

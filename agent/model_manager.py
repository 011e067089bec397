"""Which models exist, which are loaded, and loading them on first use.

Every manifest entry is checked against its sha256 at start (so READY means the models on disk are the
ones the manifest names); interpreters are only created lazily, on a model's first request.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from agent.catalog import ModelEntry, load_manifest, verified_model_bytes
from agent.errors import InvalidParams, ModelError, ModelUnavailable
from agent.inference import LoadedModel

log = logging.getLogger(__name__)


class ModelManager:
    """The catalogue of servable models and the loaded ones, safe to use from every worker thread."""

    def __init__(self, models_dir: Path, *, num_threads: int = 1) -> None:
        self.models_dir = models_dir
        self.num_threads = num_threads
        self.entries: dict[str, ModelEntry] = {entry.id: entry for entry in load_manifest(models_dir).models}
        self._loaded: dict[str, LoadedModel] = {}
        self._refused: dict[str, str] = {}
        self._lock = threading.Lock()

    def verify_all(self) -> dict[str, str]:
        """Check every model file's sha256; returns (and remembers) the refused ones with the reason."""
        for entry in self.entries.values():
            try:
                verified_model_bytes(self.models_dir, entry)
            except ModelError as exc:
                log.error("model refused: %s", exc)
                self._refused[entry.id] = str(exc)
        return dict(self._refused)

    @property
    def servable_ids(self) -> list[str]:
        return [model_id for model_id in self.entries if model_id not in self._refused]

    def entry(self, model_id: str) -> ModelEntry:
        try:
            return self.entries[model_id]
        except KeyError:
            known = ", ".join(self.entries) or "none"
            raise InvalidParams(f"unknown model {model_id!r}; this device serves: {known}") from None

    def get(self, model_id: str) -> LoadedModel:
        """The loaded model, loading (and verifying) it on first use."""
        loaded = self._loaded.get(model_id)
        if loaded is not None:
            return loaded
        entry = self.entry(model_id)
        with self._lock:
            loaded = self._loaded.get(model_id)
            if loaded is not None:
                return loaded
            if model_id in self._refused:
                raise ModelUnavailable(self._refused[model_id])
            try:
                content = verified_model_bytes(self.models_dir, entry)
                loaded = LoadedModel(entry, content, num_threads=self.num_threads)
            except ModelError as exc:
                log.error("model refused: %s", exc)
                self._refused[model_id] = str(exc)
                raise ModelUnavailable(str(exc)) from None
            except ModelUnavailable as exc:
                log.error("%s", exc.message)
                self._refused[model_id] = exc.message
                raise
            log.info("model %s %s loaded (%d bytes)", entry.id, entry.version, loaded.size_bytes)
            self._loaded[model_id] = loaded
            return loaded

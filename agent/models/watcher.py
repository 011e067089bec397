"""Hot model updates: watch ``models_dir`` and have the model manager swap in a changed manifest.

Polling, not inotify: a stat of the manifest and a listing of the directory every few seconds costs
nothing, works on every filesystem (SD cards, overlays, network mounts) and needs no extra dependency.
Any change to the manifest or to a file's inode, size or modification time triggers a reload; the
manager verifies what changed and keeps serving the old versions of anything refused. A manifest half
written when polled fails to parse and is retried when the write completes (its stamp changes again).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agent.models.catalog import FileStamp, file_stamp
from agent.models.manager import ModelManager
from agent.periodic import PeriodicTask

log = logging.getLogger(__name__)


def directory_fingerprint(models_dir: Path) -> frozenset[tuple[str, FileStamp | None]]:
    """The name and stamp of every file in ``models_dir``; equal fingerprints mean nothing changed."""
    try:
        names = [entry.name for entry in os.scandir(models_dir) if not entry.is_dir()]
    except OSError:
        return frozenset()
    return frozenset((name, file_stamp(models_dir / name)) for name in names)


class ModelWatcher:
    """A thread that calls :meth:`ModelManager.reload` when ``models_dir`` changes."""

    def __init__(self, models: ModelManager, interval_s: float) -> None:
        self.models = models
        self.interval_s = interval_s
        self._fingerprint = directory_fingerprint(models.models_dir)
        # A bug in one reload must not end hot updates for the life of the process.
        self._task = PeriodicTask("model-watcher", "model_watcher", interval_s, self.poll)

    def poll(self) -> bool:
        """Check once; reloads (and returns True) if anything in ``models_dir`` changed since the last poll."""
        fingerprint = directory_fingerprint(self.models.models_dir)
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        log.info("%s changed: reloading the model catalogue", self.models.models_dir)
        self.models.reload()
        return True

    def start(self) -> None:
        self._task.start()

    def stop(self) -> None:
        self._task.stop()

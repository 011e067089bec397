"""Resumable chunked download of a bundle's files over the cloud MQTT link (devices behind NAT need only the broker).

Wire (docs/deploy.md). The device publishes ``{"bundle": "<model>@<version>", "file": name, "chunks": [i, ...]}``
(QoS 0) on ``mcp/files/req/{device}``; the file service answers each chunk on ``mcp/files/res/{device}`` with
the raw bytes as payload and the MQTT 5 user properties ``bundle``, ``file`` and ``chunk`` (or ``error``).
At most ``chunk_request_window`` chunks are awaited at once; one unanswered for ``chunk_timeout_s`` is asked
for again, so a lost request, a cloud outage or a file service restart costs a retry, never the download.

Each chunk is checked against its sha256 in the signed manifest before it is written at its offset in
``data_dir/deploy/staging/<bundle>/<file>``, then journaled. After a restart the journaled chunks are hashed
again on disk (a power cut may lose file data the journal already counts) and only the missing ones fetched.
When every chunk is in, the whole file's sha256 is checked and the file synced.

Space. A bundle is refused before anything is fetched if the staging directory would exceed
``[deploy] staging_budget_bytes`` or the disk would keep less than :data:`DISK_HEADROOM_BYTES` free; the
files are allocated in full up front (``posix_fallocate``), so a download never fills the disk the outbox
lives on. Nothing outside the staging directory is ever removed to make room.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from agent.deploy.documents import BundleFile, BundleManifest
from agent.deploy.journal import Journal
from agent.errors import DeployError
from agent.upstream.uplink import CloudMessage

log = logging.getLogger(__name__)

DISK_HEADROOM_BYTES = 8 * 1024 * 1024
_MAX_QUEUED_CHUNKS = 512


class Transfer:
    """Fetches bundles into ``staging_dir``; :meth:`on_message` is the cloud subscription's handler."""

    def __init__(
        self,
        journal: Journal,
        staging_dir: Path,
        *,
        budget_bytes: int,
        request: Callable[[bytes], bool],
        window: int = 8,
        chunk_timeout_s: float = 10.0,
        headroom_bytes: int = DISK_HEADROOM_BYTES,
    ) -> None:
        self._journal = journal
        self.staging_dir = staging_dir
        self._budget = budget_bytes
        self._request = request
        self._window = window
        self._chunk_timeout = chunk_timeout_s
        self._headroom = headroom_bytes
        self._arrivals: queue.Queue[CloudMessage | None] = queue.Queue(_MAX_QUEUED_CHUNKS)
        self.counts = {"chunks": 0, "bytes": 0, "rejected": 0, "requests": 0}

    def on_message(self, message: CloudMessage) -> None:
        """A file service answer (cloud connection thread: hands it over, never blocks)."""
        try:
            self._arrivals.put_nowait(message)
        except queue.Full:
            self.counts["rejected"] += 1  # the request times out and is repeated

    def wake(self) -> None:
        """Make a waiting :meth:`fetch` look at its stop condition now."""
        try:
            self._arrivals.put_nowait(None)
        except queue.Full:
            pass

    def bundle_dir(self, manifest: BundleManifest) -> Path:
        return self.staging_dir / manifest.bundle_id

    def reserve(self, manifest: BundleManifest) -> None:
        """Check the budget and free disk space, then allocate the staging files in full; raises DeployError."""
        directory = self.bundle_dir(manifest)
        held_here = _tree_bytes(directory)
        elsewhere = _tree_bytes(self.staging_dir) - held_here
        needed = manifest.total_bytes
        if elsewhere + needed > self._budget:
            raise DeployError(
                f"bundle {manifest.bundle_id} needs {needed} bytes of staging, {self._budget - elsewhere} of "
                f"[deploy] staging_budget_bytes={self._budget} are left"
            )
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
        if free - (needed - held_here) < self._headroom:
            raise DeployError(
                f"bundle {manifest.bundle_id} needs {needed - held_here} more bytes of disk in {directory}, "
                f"{free} are free and {self._headroom} must stay free"
            )
        for described in manifest.files:
            fd = os.open(directory / described.name, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, described.size)
            except OSError as exc:
                raise DeployError(f"cannot allocate {described.size} bytes for {described.name}: {exc}") from None
            finally:
                os.close(fd)

    def discard(self, bundle_id: str) -> None:
        """Remove a bundle's staging files and progress."""
        shutil.rmtree(self.staging_dir / bundle_id, ignore_errors=True)
        self._journal.forget_chunks(bundle_id)

    def fetch(self, manifest: BundleManifest, stop: Callable[[], str | None]) -> dict[str, Path] | str:
        """Download what is missing of every file; returns name -> verified path, or ``stop()``'s reason.

        ``stop`` is polled between chunks (a newer document, a cancel, a deadline); a non-None reason ends
        the fetch with the progress kept.
        """
        self.reserve(manifest)
        paths = {}
        for described in manifest.files:
            path = self.bundle_dir(manifest) / described.name
            reason = self._fetch_file(manifest.bundle_id, described, path, stop)
            if reason is not None:
                return reason
            paths[described.name] = path
        return paths

    def missing_chunks(self, manifest: BundleManifest) -> int:
        """How many chunks are still to fetch, journaled ones checked on disk (what a resume starts with)."""
        self.reserve(manifest)
        return sum(
            len(self._missing_on_disk(manifest.bundle_id, described, self.bundle_dir(manifest) / described.name))
            for described in manifest.files
        )

    def _fetch_file(
        self, bundle_id: str, described: BundleFile, path: Path, stop: Callable[[], str | None]
    ) -> str | None:
        missing = self._missing_on_disk(bundle_id, described, path)
        asked: dict[int, float] = {}
        fd = os.open(path, os.O_RDWR)
        try:
            while missing:
                reason = stop()
                if reason is not None:
                    return reason
                now = time.monotonic()
                due = [i for i in sorted(missing) if now - asked.get(i, -1e18) >= self._chunk_timeout]
                awaited = sum(1 for i, at in asked.items() if i in missing and now - at < self._chunk_timeout)
                room = self._window - awaited
                if due and room > 0:
                    wanted = due[:room]
                    body = {"bundle": bundle_id, "file": described.name, "chunks": wanted}
                    if self._request(json.dumps(body).encode()):
                        self.counts["requests"] += 1
                    for index in wanted:
                        asked[index] = now
                try:
                    message = self._arrivals.get(timeout=min(1.0, self._chunk_timeout))
                except queue.Empty:
                    continue
                if message is not None:
                    index = self._accept(bundle_id, described, message, fd)
                    if index is not None and index in missing:
                        missing.discard(index)
                        self._journal.chunk_done(bundle_id, described.name, index)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._check_whole(bundle_id, described, path)
        return None

    def _accept(self, bundle_id: str, described: BundleFile, message: CloudMessage, fd: int) -> int | None:
        props = message.user_properties
        if props.get("bundle") != bundle_id or props.get("file") != described.name:
            return None  # an answer to an earlier download: ignored
        if "error" in props:
            raise DeployError(f"the file service cannot serve {bundle_id}/{described.name}: {props['error']}")
        try:
            index = int(props.get("chunk", ""))
        except ValueError:
            index = -1
        if not 0 <= index < len(described.chunks):
            self.counts["rejected"] += 1
            return None
        if (
            len(message.payload) != described.chunk_length(index)
            or hashlib.sha256(message.payload).hexdigest() != described.chunks[index]
        ):
            self.counts["rejected"] += 1
            log.warning("deploy: chunk %d of %s/%s does not match its hash; asking again", index, bundle_id,
                        described.name)  # fmt: skip
            return None
        os.pwrite(fd, message.payload, index * described.chunk_size)
        self.counts["chunks"] += 1
        self.counts["bytes"] += len(message.payload)
        return index

    def _missing_on_disk(self, bundle_id: str, described: BundleFile, path: Path) -> set[int]:
        journaled = self._journal.chunks_done(bundle_id, described.name)
        lost = set()
        with open(path, "rb") as handle:
            for index in sorted(journaled):
                if index >= len(described.chunks):
                    lost.add(index)
                    continue
                handle.seek(index * described.chunk_size)
                if hashlib.sha256(handle.read(described.chunk_length(index))).hexdigest() != described.chunks[index]:
                    lost.add(index)
        if lost:
            log.warning("deploy: %d journaled chunks of %s/%s were lost on disk; fetching them again", len(lost),
                        bundle_id, described.name)  # fmt: skip
            self._journal.forget_chunks(bundle_id, described.name, lost)
        return set(range(len(described.chunks))) - (journaled - lost)

    def _check_whole(self, bundle_id: str, described: BundleFile, path: Path) -> None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != described.sha256:
            self._journal.forget_chunks(bundle_id, described.name)
            raise DeployError(f"{bundle_id}/{described.name}: every chunk matched but the file's sha256 does not")


def staging_dir(data_dir: Path) -> Path:
    """Where bundles are staged under ``data_dir``."""
    return data_dir / "deploy" / "staging"


def _tree_bytes(directory: Path) -> int:
    if not directory.exists():
        return 0
    return sum(os.stat(p).st_blocks * 512 for p in directory.rglob("*") if p.is_file())

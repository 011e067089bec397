"""The deployment journal: ``data_dir/deploy/journal.db`` (SQLite, WAL, ``synchronous=FULL``, as the outbox).

It holds every deployment this device accepted with its current state and reason, each transition it went
through, the last accepted sequence number, which chunks of which bundle are on disk, and the trust state
(key list, last signed time). The state machine commits a transition here *before* acting on it, so after
kill -9 or a power cut it resumes from the last committed state, never from a guess.

One process writes (the agent, holding ``journal.db.lock``); ``edge-agent deploy status`` opens it read-only
while the agent runs. Calls are serialised by a lock, so any thread may use one :class:`Journal`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import peewee
from pydantic import BaseModel, ConfigDict

from agent.deploy.documents import DeploymentDocument, SignedEnvelope
from agent.errors import DeployError, OutboxError
from agent.upstream.outbox_file import lock_exclusive, write_transaction

State = Literal[
    "received", "verified", "downloading", "staged", "activating", "probation", "active",
    "failed", "rolled_back", "superseded", "cancelled", "timed_out",
]  # fmt: skip
STATES: tuple[State, ...] = get_args(State)
TERMINAL: frozenset[State] = frozenset({"active", "failed", "rolled_back", "superseded", "cancelled", "timed_out"})
LAST_SEQUENCE = "deploy.last_sequence"
JOURNAL_FILE = "journal.db"


class Transition(BaseModel):
    model_config = ConfigDict(frozen=True)

    state: State
    reason: str | None
    at: float


class DeploymentRecord(BaseModel):
    """One deployment as journaled: its document, where it stands and why."""

    model_config = ConfigDict(frozen=True)

    deployment_id: str
    sequence: int
    source: str
    document: str
    bundle_id: str | None
    model_id: str | None
    version: str | None
    state: State
    reason: str | None
    entered_at: float
    accepted_at: float
    previous: dict[str, Any] | None = None
    history: tuple[Transition, ...] = ()

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def deployment_document(self) -> DeploymentDocument:
        """The journaled document (verified when it was accepted; the journal holds its signed bytes)."""
        return DeploymentDocument.model_validate(SignedEnvelope.model_validate_json(self.document).payload)


@dataclass(frozen=True)
class _Tables:
    deployment: Any
    transition: Any
    chunk: Any
    value: Any


def _bind(db: peewee.SqliteDatabase) -> _Tables:
    class Deployment(peewee.Model):
        deployment_id = peewee.TextField(primary_key=True)
        sequence = peewee.IntegerField()
        source = peewee.TextField()
        document = peewee.TextField()
        bundle_id = peewee.TextField(null=True)
        model_id = peewee.TextField(null=True)
        version = peewee.TextField(null=True)
        state = peewee.TextField()
        reason = peewee.TextField(null=True)
        entered_at = peewee.FloatField()
        accepted_at = peewee.FloatField()
        previous = peewee.TextField(null=True)

        class Meta:
            database = db
            table_name = "deployment"

    class TransitionRow(peewee.Model):
        id = peewee.AutoField()
        deployment_id = peewee.TextField(index=True)
        state = peewee.TextField()
        reason = peewee.TextField(null=True)
        at = peewee.FloatField()

        class Meta:
            database = db
            table_name = "transition"

    class Chunk(peewee.Model):
        bundle_id = peewee.TextField()
        file = peewee.TextField()
        idx = peewee.IntegerField()

        class Meta:
            database = db
            table_name = "chunk"
            primary_key = peewee.CompositeKey("bundle_id", "file", "idx")

    class Value(peewee.Model):
        name = peewee.TextField(primary_key=True)
        value = peewee.TextField()

        class Meta:
            database = db
            table_name = "value"

    return _Tables(Deployment, TransitionRow, Chunk, Value)


class Journal:
    """The journal at ``path``; ``read_only=True`` for inspecting a running agent's journal."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        if read_only:
            if not self.path.exists():
                raise DeployError(f"no deployment journal at {self.path}")
            self._db = peewee.SqliteDatabase(
                f"file:{self.path}?mode=ro", uri=True, timeout=5, thread_safe=False, check_same_thread=False,
                pragmas={"query_only": 1},
            )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock_exclusive(self.path)
            self._db = peewee.SqliteDatabase(
                str(self.path), timeout=5, thread_safe=False, check_same_thread=False, autoconnect=False,
                pragmas={"journal_mode": "wal", "synchronous": "full"},
            )  # fmt: skip
        self._db.connect()
        self._t = _bind(self._db)
        if not read_only:
            with self._lock, write_transaction(self._db):
                self._db.create_tables([self._t.deployment, self._t.transition, self._t.chunk, self._t.value])

    def close(self) -> None:
        with self._lock:
            if not self._db.is_closed():
                self._db.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    # -- named values (the trust store, the last sequence) ------------------------------------------

    def get_value(self, name: str) -> str | None:
        with self._lock:
            row = self._t.value.get_or_none(self._t.value.name == name)
            return None if row is None else str(row.value)

    def put_value(self, name: str, value: str) -> None:
        with self._lock, write_transaction(self._db):
            self._t.value.replace(name=name, value=value).execute()

    def last_sequence(self) -> int:
        """The highest sequence number accepted so far (-1: none)."""
        stored = self.get_value(LAST_SEQUENCE)
        return int(stored) if stored is not None else -1

    # -- deployments --------------------------------------------------------------------------------

    def accept(
        self, deployment_id: str, sequence: int, source: str, document: str,
        bundle: tuple[str, str, str] | None, reason: str | None = None,
    ) -> DeploymentRecord:  # fmt: skip
        """Journal a newly accepted document as ``received`` and raise the last accepted sequence, atomically."""
        now = time.time()
        bundle_id, model_id, version = bundle if bundle is not None else (None, None, None)
        with self._lock, write_transaction(self._db):
            self._t.deployment.replace(
                deployment_id=deployment_id, sequence=sequence, source=source, document=document,
                bundle_id=bundle_id, model_id=model_id, version=version, state="received", reason=reason,
                entered_at=now, accepted_at=now, previous=None,
            ).execute()  # fmt: skip
            self._t.transition.create(deployment_id=deployment_id, state="received", reason=reason, at=now)
            self._t.value.replace(name=LAST_SEQUENCE, value=str(sequence)).execute()
        return self.get(deployment_id)

    def transition(
        self, deployment_id: str, state: State, reason: str | None = None, *, previous: dict[str, Any] | None = None
    ) -> DeploymentRecord:
        """Commit ``deployment_id``'s move to ``state`` (with why); a terminal deployment never moves again."""
        now = time.time()
        with self._lock, write_transaction(self._db):
            row = self._t.deployment.get_or_none(self._t.deployment.deployment_id == deployment_id)
            if row is None:
                raise DeployError(f"no deployment {deployment_id} in the journal")
            if row.state in TERMINAL:
                raise DeployError(f"deployment {deployment_id} is already {row.state}")
            row.state, row.reason, row.entered_at = state, reason, now
            if previous is not None:
                row.previous = json.dumps(previous)
            row.save()
            self._t.transition.create(deployment_id=deployment_id, state=state, reason=reason, at=now)
        return self.get(deployment_id)

    def get(self, deployment_id: str) -> DeploymentRecord:
        with self._lock:
            row = self._t.deployment.get_or_none(self._t.deployment.deployment_id == deployment_id)
            if row is None:
                raise DeployError(f"no deployment {deployment_id} in the journal")
            return self._record(row)

    def unfinished(self) -> list[DeploymentRecord]:
        """Deployments not in a terminal state, oldest sequence first (normally at most one)."""
        with self._lock:
            table = self._t.deployment
            rows = table.select().where(table.state.not_in(list(TERMINAL))).order_by(table.sequence)
            return [self._record(row) for row in rows]

    def recent(self, limit: int = 20) -> list[DeploymentRecord]:
        """The latest ``limit`` deployments, newest sequence first, with their transitions."""
        with self._lock:
            table = self._t.deployment
            return [self._record(row) for row in table.select().order_by(table.sequence.desc()).limit(limit)]

    def active_versions(self) -> dict[str, str]:
        """model id -> version of the latest deployment of each model that became active."""
        with self._lock:
            table = self._t.deployment
            rows = table.select().where(table.state == "active").order_by(table.sequence)
            return {row.model_id: row.version for row in rows if row.model_id is not None}

    def report(self, limit: int = 20) -> dict[str, Any]:
        """What ``edge-agent deploy status`` prints: the latest deployments with their transitions."""
        with self._lock:
            return {
                "journal": str(self.path),
                "last_sequence": self.last_sequence(),
                "active": self.active_versions(),
                "in_progress": [r.deployment_id for r in self.unfinished()],
                "deployments": [r.model_dump(mode="json", exclude={"document"}) for r in self.recent(limit)],
            }

    def snapshot(self) -> dict[str, Any]:
        """The active deployed version per model and the deployment in progress (for the status and metrics)."""
        with self._lock:
            unfinished = self.unfinished()
            current = unfinished[-1] if unfinished else None
            return {
                "active": self.active_versions(),
                "in_progress": None if current is None else {
                    "deployment_id": current.deployment_id, "state": current.state, "model_id": current.model_id,
                    "version": current.version, "since": current.entered_at,
                },
            }  # fmt: skip

    # -- chunk progress -----------------------------------------------------------------------------

    def chunks_done(self, bundle_id: str, file: str) -> set[int]:
        with self._lock:
            table = self._t.chunk
            return {row.idx for row in table.select().where((table.bundle_id == bundle_id) & (table.file == file))}

    def chunk_done(self, bundle_id: str, file: str, index: int) -> None:
        with self._lock, write_transaction(self._db):
            self._t.chunk.insert(bundle_id=bundle_id, file=file, idx=index).on_conflict_ignore().execute()

    def forget_chunks(self, bundle_id: str, file: str | None = None, indexes: set[int] | None = None) -> None:
        """Drop chunk progress: of a bundle, of one of its files, or of some chunks of it."""
        with self._lock, write_transaction(self._db):
            table = self._t.chunk
            condition = table.bundle_id == bundle_id
            if file is not None:
                condition &= table.file == file
            if indexes is not None:
                condition &= table.idx.in_(sorted(indexes))
            table.delete().where(condition).execute()

    def _record(self, row: Any) -> DeploymentRecord:
        table = self._t.transition
        history = table.select().where(table.deployment_id == row.deployment_id).order_by(table.id)
        return DeploymentRecord(
            deployment_id=row.deployment_id, sequence=row.sequence, source=row.source, document=row.document,
            bundle_id=row.bundle_id, model_id=row.model_id, version=row.version, state=row.state,
            reason=row.reason, entered_at=row.entered_at, accepted_at=row.accepted_at,
            previous=json.loads(row.previous) if row.previous else None,
            history=tuple(Transition(state=t.state, reason=t.reason, at=t.at) for t in history),
        )  # fmt: skip



def _lock_exclusive(path: Path) -> int:
    try:
        return lock_exclusive(path)
    except OutboxError:
        raise DeployError(f"deployment journal {path} is in use by another process ({path}.lock)") from None

"""One group commit: a batch of upstream messages decoded, verified and written in one transaction.

:meth:`RecordStore.prepare` decodes and verifies a batch; :meth:`RecordStore.write` then either writes
every record of it (stored, duplicate, quarantined or held) or raises one of
:data:`~provisioning.ingest.schema.DATABASE_ERRORS` having written nothing, so the caller may acknowledge
the batch's messages exactly when it returns. Storing is idempotent on ``msg_id``:
a record already stored (a resend, a copy another worker took) is counted as a duplicate and left alone.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import peewee
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.errors import AgentError, UpstreamFormatError
from agent.mqtt.topics import upstream_topic_parts
from agent.signing.delegation import certificate_thumbprint
from agent.upstream.uplink_wire import DEFAULT_MAX_DECODED_BYTES, UpstreamRecord, decode_upstream
from provisioning.ingest.schema import DATABASE_ERRORS, Certificate, DeployEvent, Held, Quarantined, Record
from provisioning.ingest.trust import CertificateCache, DeviceKeys, Verdict, Verifier

log = logging.getLogger(__name__)

ROWS_PER_INSERT = 100  # well under SQLite's bound on variables in one statement
SWEEP_LIMIT = 500
# What a database (or its driver, before sending) raises for a value it cannot take, connection errors aside:
# psycopg2 refuses NUL in text with ValueError, sqlite3 integers beyond 64 bits with OverflowError.
REFUSED_CONTENT: tuple[type[Exception], ...] = (peewee.DatabaseError, ValueError, OverflowError)


@dataclass(frozen=True)
class Incoming:
    """One MQTT message as received."""

    topic: str
    payload: bytes
    user_properties: dict[str, str]
    received_at: float


@dataclass
class Tally:
    """What a commit (or a worker, summed) did with its records."""

    stored: int = 0
    duplicates: int = 0
    held: int = 0
    released: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)

    def add(self, other: Tally) -> None:
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.held += other.held
        self.released += other.released
        self.quarantined.update(other.quarantined)


@dataclass
class Planned:
    """The rows one message (or a whole batch, merged) adds to each table."""

    records: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    held: list[dict[str, Any]] = field(default_factory=list)
    certificates: dict[str, dict[str, Any]] = field(default_factory=dict)
    deploy_events: list[dict[str, Any]] = field(default_factory=list)


class RecordStore:
    """Decodes, verifies and stores batches of upstream messages in the bound fleet database."""

    def __init__(
        self, database: peewee.Database, keys: DeviceKeys, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    ) -> None:
        self.database = database
        self.keys = keys
        self.max_decoded_bytes = max_decoded_bytes
        self.verifier = Verifier(keys, CertificateCache(_load_certificate))

    def prepare(self, batch: Sequence[Incoming]) -> list[tuple[Incoming, Planned]]:
        """Decode and verify a batch (reading certificates from the database): what :meth:`write` stores."""
        self._refresh_keys()
        prepared = []
        for item in batch:
            writes = Planned()
            self._decode_into(item, writes)
            prepared.append((item, writes))
        return prepared

    def write(self, prepared: list[tuple[Incoming, Planned]]) -> Tally:
        """Store a prepared batch in one transaction; raises a connection error having written nothing.

        A batch the database refuses for its content (not for being unreachable) is written message by
        message, and a message that still cannot be written is quarantined as ``unstorable``: one bad
        message must not stall the subscription behind it.
        """
        try:
            return self._write_transaction(_merged(writes for _, writes in prepared))
        except DATABASE_ERRORS:
            raise
        except REFUSED_CONTENT as exc:
            log.error("the database refused a batch of %d messages (%s); writing them one by one", len(prepared), exc)
        tally = Tally()
        for item, writes in prepared:
            try:
                tally.add(self._write_transaction(writes))
            except DATABASE_ERRORS:
                raise
            except REFUSED_CONTENT as exc:
                with self._transaction():
                    _insert(Quarantined, [_undecodable(item, None, f"the database refused it: {exc}", "unstorable")])
                tally.quarantined["unstorable"] += 1
        return tally

    def _write_transaction(self, writes: Planned) -> Tally:
        with self._transaction():
            tally = self._write(writes)
            if writes.certificates:
                tally.add(self._release(Held.thumbprint.in_(list(writes.certificates))))
        return tally

    def _transaction(self) -> Any:
        # SQLite: take the write lock at BEGIN (waiting up to the busy timeout). A deferred transaction that
        # reads first fails at once with SQLITE_BUSY when another worker has committed meanwhile.
        if isinstance(self.database, peewee.SqliteDatabase):
            return self.database.atomic(lock_type="IMMEDIATE")
        return self.database.atomic()

    def drop_connection(self) -> None:
        """Close this thread's connection (one that failed, or at the end); the next statement opens a new one."""
        try:
            self.database.close()
        except peewee.PeeweeException as exc:  # already broken: nothing to close cleanly
            log.debug("closing the failed database connection: %s", exc)

    def release_held(self) -> Tally:
        """Verify and store held records whose certificate has meanwhile arrived (through any worker)."""
        with self._transaction():
            waiting = Held.select(Held.thumbprint).join(Certificate, on=(Held.thumbprint == Certificate.thumbprint))
            return self._release(Held.thumbprint.in_(waiting))

    def _refresh_keys(self) -> None:
        try:
            self.keys.refresh()
        except (OSError, AgentError) as exc:
            # An inventory being rewritten by hand must not stop the ingest: keep the keys read last.
            log.error("cannot read the fleet inventory, keeping the device keys read before: %s", exc)

    def _decode_into(self, item: Incoming, writes: Planned) -> None:
        parts = upstream_topic_parts(item.topic)
        try:
            if parts is None:
                raise UpstreamFormatError(f"not an upstream topic: {item.topic!r}")
            records = decode_upstream(item.topic, item.payload, item.user_properties, self.max_decoded_bytes)
        except UpstreamFormatError as exc:
            writes.quarantine.append(_undecodable(item, parts[0] if parts else None, str(exc)))
            return
        topic_device, topic_class = parts
        # A certificate may arrive in the same batch as the records it signs: check certificates first.
        records.sort(key=lambda record: 0 if record.cls == "audit" else 1)
        for record in records:
            if record.cls != topic_class:
                verdict = Verdict(
                    "quarantine", record, reason="envelope_mismatch",
                    detail=f"a {record.cls!r} record on a {topic_class!r} topic",
                )  # fmt: skip
            else:
                verdict = self.verifier.check(topic_device, record, time.time())
            _plan(verdict, item, writes)

    def _write(self, writes: Planned) -> Tally:
        tally = Tally()
        if writes.certificates:
            _insert(Certificate, list(writes.certificates.values()))
        unique = {row["msg_id"]: row for row in writes.records}
        present = _existing(Record, unique)
        _insert(Record, [row for msg_id, row in unique.items() if msg_id not in present])
        events = {row["msg_id"]: row for row in writes.deploy_events if row["msg_id"] not in present}
        _insert(DeployEvent, list(events.values()))
        tally.stored = len(unique) - len(present)
        tally.duplicates = len(writes.records) - tally.stored
        held = {row["msg_id"]: row for row in writes.held if row["msg_id"] not in unique}
        stored_already = _existing(Record, held)
        _insert(Held, [row for msg_id, row in held.items() if msg_id not in stored_already])
        tally.held = len(held) - len(stored_already)
        tally.duplicates += len(writes.held) - tally.held
        if writes.quarantine:
            _insert(Quarantined, writes.quarantine)
        tally.quarantined.update(row["reason"] for row in writes.quarantine)
        return tally

    def _release(self, which: peewee.Expression) -> Tally:
        """Re-verify the held records ``which`` selects now that their certificates are known; runs inside
        the caller's transaction."""
        rows = list(Held.select().where(which).limit(SWEEP_LIMIT))
        if not rows:
            return Tally()
        writes = Planned()
        for row in rows:
            record = UpstreamRecord.model_validate_json(row.envelope)
            verdict = self.verifier.check(row.device_id, record, time.time())
            item = Incoming(row.topic, b"", {}, row.received_at)
            _plan(verdict, item, writes)
        Held.delete().where(Held.msg_id.in_([row.msg_id for row in rows])).execute()
        tally = self._write(writes)
        tally.released = len(rows) - tally.held
        return tally


def _merged(parts: Iterable[Planned]) -> Planned:
    merged = Planned()
    for part in parts:
        merged.records += part.records
        merged.quarantine += part.quarantine
        merged.held += part.held
        merged.certificates.update(part.certificates)
        merged.deploy_events += part.deploy_events
    return merged


def _plan(verdict: Verdict, item: Incoming, writes: Planned) -> None:
    record = verdict.record
    if verdict.certificate is not None:
        writes.certificates.setdefault(*_certificate_row(verdict.certificate, record.device_id, item.received_at))
    if verdict.outcome == "store":
        writes.records.append(
            {
                "msg_id": record.msg_id, "device_id": record.device_id, "kind": record.cls, "seq": record.seq,
                "enqueued_at": record.enqueued_at, "received_at": item.received_at, "signed_at": verdict.signed_at,
                "signer": verdict.signer, "kid": verdict.kid, "client_id": verdict.client_id,
                "method": verdict.method, "body": json.dumps(record.body, separators=(",", ":"), ensure_ascii=False),
            }
        )  # fmt: skip
        if record.cls == "deploy" and isinstance(record.body, dict):
            writes.deploy_events.append(_deploy_event_row(record, item.received_at))
    elif verdict.outcome == "hold":
        writes.held.append(
            {
                "msg_id": record.msg_id, "device_id": record.device_id, "kind": record.cls,
                "thumbprint": verdict.thumbprint, "topic": item.topic, "received_at": item.received_at,
                "envelope": record.model_dump_json(by_alias=True),
            }
        )  # fmt: skip
    else:
        writes.quarantine.append(
            _quarantine_row(
                msg_id=record.msg_id, device_id=record.device_id, kind=record.cls, topic=item.topic,
                reason=verdict.reason, detail=verdict.detail, received_at=item.received_at,
                content=record.model_dump_json(by_alias=True),
            )
        )  # fmt: skip


def _deploy_event_row(record: UpstreamRecord, received_at: float) -> dict[str, Any]:
    """A deploy record's body in columns (agent.deploy.deployer sends ``transition`` and ``refused`` events)."""
    body = record.body

    def text(name: str, limit: int = 64) -> str | None:
        value = body.get(name)
        return None if value is None else str(value)[:limit]

    sequence = body.get("sequence")
    at = body.get("at")
    return {
        "msg_id": record.msg_id, "device_id": record.device_id, "deployment_id": text("deployment_id"),
        "sequence": sequence if isinstance(sequence, int) and abs(sequence) < 2**63 else None,
        "event": text("event", 16) or "unknown", "state": text("state", 16), "reason": text("reason", 4096),
        "model_id": text("model_id"), "version": text("version"),
        "at": float(at) if isinstance(at, (int, float)) else received_at, "seq": record.seq, "received_at": received_at,
    }  # fmt: skip


def _certificate_row(certificate: x509.Certificate, device_id: str, received_at: float) -> tuple[str, dict[str, Any]]:
    thumbprint = certificate_thumbprint(certificate.public_bytes(Encoding.DER))
    return thumbprint, {
        "thumbprint": thumbprint, "device_id": device_id,
        "pem": certificate.public_bytes(Encoding.PEM).decode("ascii"),
        "not_before": certificate.not_valid_before_utc.timestamp(),
        "not_after": certificate.not_valid_after_utc.timestamp(), "received_at": received_at,
    }  # fmt: skip


def _load_certificate(thumbprint: str) -> x509.Certificate | None:
    row = Certificate.get_or_none(Certificate.thumbprint == thumbprint)
    return x509.load_pem_x509_certificate(row.pem.encode("ascii")) if row is not None else None


def _existing(model: type[Record], msg_ids: Iterable[str]) -> set[str]:
    wanted = list(msg_ids)
    found: set[str] = set()
    for chunk in peewee.chunked(wanted, ROWS_PER_INSERT):
        found.update(row.msg_id for row in model.select(model.msg_id).where(model.msg_id.in_(chunk)))
    return found


def _insert(model: type[peewee.Model], rows: list[dict[str, Any]]) -> None:
    # Ignoring conflicts makes two workers storing the same msg_id at once harmless: one row wins.
    for chunk in peewee.chunked(rows, ROWS_PER_INSERT):
        model.insert_many(chunk).on_conflict_ignore().execute()


def _undecodable(item: Incoming, device_id: str | None, detail: str, reason: str = "undecodable") -> dict[str, Any]:
    try:
        content = item.payload.decode("utf-8")
    except UnicodeDecodeError:
        content = ""
    if not content or "\x00" in content:  # PostgreSQL text cannot hold NUL
        content = "base64:" + base64.b64encode(item.payload).decode("ascii")
    return _quarantine_row(
        msg_id=item.user_properties.get("msg-id"), device_id=device_id, kind=None, topic=item.topic, reason=reason,
        detail=detail, received_at=item.received_at, content=content,
    )  # fmt: skip


def _quarantine_row(**row: Any) -> dict[str, Any]:
    """A quarantine row fitted to its columns: what failed is whatever a sender chose to send."""
    for column, limit in (("msg_id", 64), ("device_id", 64), ("kind", 16), ("topic", 512)):
        if row[column] is not None:
            row[column] = row[column][:limit]
    for column in ("detail", "content"):
        row[column] = row[column].replace("\x00", "\\u0000")
    return row

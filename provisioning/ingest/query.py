"""What ``fleet query`` shows: stored records, quarantined and held ones, and totals, as JSON-ready dicts."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from collections.abc import Iterable
from typing import Any, Literal, cast

import peewee
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, NaiveDatetime

from provisioning.ingest.schema import Certificate, Held, Quarantined, Record

Table = Literal["records", "quarantine", "held"]
_TABLES: dict[Table, type[Record] | type[Quarantined] | type[Held]] = {
    "records": Record, "quarantine": Quarantined, "held": Held
}  # fmt: skip


class RecordFilter(BaseModel):
    """The filters of ``fleet query``; times without a zone are UTC, and filter on arrival at the ingest."""

    model_config = ConfigDict(extra="forbid")

    table: Table = "records"
    device: str | None = None
    kind: str | None = None
    since: AwareDatetime | NaiveDatetime | None = None
    until: AwareDatetime | NaiveDatetime | None = None
    limit: int = Field(100, ge=1, le=1_000_000)

    def bounds(self) -> tuple[float | None, float | None]:
        """``since`` and ``until`` as POSIX seconds."""
        return _seconds(self.since), _seconds(self.until)


def query(selection: RecordFilter) -> list[dict[str, Any]]:
    """Rows of the selected table matching the filter, oldest arrival first."""
    model = _TABLES[selection.table]
    conditions = []
    if selection.device is not None:
        conditions.append(model.device_id == selection.device)
    if selection.kind is not None:
        conditions.append(model.kind == selection.kind)
    since, until = selection.bounds()
    if since is not None:
        conditions.append(model.received_at >= since)
    if until is not None:
        conditions.append(model.received_at < until)
    rows = model.select().order_by(model.received_at, model._meta.primary_key).limit(selection.limit)
    if conditions:
        rows = rows.where(*conditions)
    return [_describe(row) for row in rows]


def totals() -> dict[str, Any]:
    """Counts: records by device and kind, quarantined by reason, held, certificates."""
    records: dict[str, dict[str, int]] = {}
    by_kind = Record.select(Record.device_id, Record.kind, peewee.fn.COUNT(Record.msg_id))
    by_kind = by_kind.group_by(Record.device_id, Record.kind).order_by(Record.device_id, Record.kind)
    rows = cast(Iterable[tuple[str, str, int]], by_kind.tuples())
    for device_id, kind, count in rows:
        records.setdefault(device_id, {})[kind] = count
    reasons = Quarantined.select(Quarantined.reason, peewee.fn.COUNT(Quarantined.id)).group_by(Quarantined.reason)
    return {
        "records": records,
        "quarantined": dict(cast(Iterable[tuple[str, int]], reasons.order_by(Quarantined.reason).tuples())),
        "held": Held.select().count(),
        "certificates": Certificate.select().count(),
    }


def _describe(row: peewee.Model) -> dict[str, Any]:
    described: dict[str, Any] = {}
    for name, value in row.__data__.items():
        if name in ("received_at", "enqueued_at", "signed_at") and value is not None:
            value = _iso(value)
        elif name == "body" or name == "envelope":
            value = json.loads(value)
        described[name] = value
    return described


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _seconds(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)).timestamp()

"""The fleet's record store: five Peewee tables, on SQLite (one file) or PostgreSQL (``--db postgresql://...``).

- ``fleet_records``: every verified record, once (``msg_id`` is the primary key);
- ``fleet_quarantine``: what failed verification or decoding, with the reason, never trusted;
- ``fleet_held``: records signed by a delegated key whose certificate (``x5t#S256``) has not arrived yet;
- ``fleet_certificates``: delegation certificates devices sent upstream, checked against their device key;
- ``fleet_deploy_events``: the ``deploy`` records among the stored ones, in columns (what rollouts read).

Times are POSIX seconds (doubles) so that both databases compare and index them the same way. docs/fleet.md
documents every column. Models are bound to one database per process (:func:`open_database`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import peewee
from playhouse.db_url import connect

from agent.errors import ProvisioningError

# The ingest acknowledges to the broker only after its commit: SQLite must have fsynced by then (WAL with
# synchronous=FULL), and workers in other processes share the file (busy_timeout in ms, via ``timeout``).
SQLITE_PRAGMAS = {"journal_mode": "wal", "synchronous": "full", "foreign_keys": 1}
SQLITE_BUSY_TIMEOUT_S = 30.0
# What a lost or refused database connection raises (psycopg errors are wrapped into these by Peewee).
DATABASE_ERRORS: tuple[type[Exception], ...] = (peewee.OperationalError, peewee.InterfaceError)


class FleetModel(peewee.Model):
    class Meta:
        legacy_table_names = False


class Record(FleetModel):
    """A verified record, stored once whatever the number of copies received."""

    msg_id = peewee.CharField(max_length=64, primary_key=True)
    device_id = peewee.CharField(max_length=64)
    kind = peewee.CharField(max_length=16)
    seq = peewee.BigIntegerField()
    enqueued_at = peewee.DoubleField()
    received_at = peewee.DoubleField()
    signed_at = peewee.BigIntegerField()
    signer = peewee.CharField(max_length=16)
    kid = peewee.CharField(max_length=64, null=True)
    client_id = peewee.TextField(null=True)
    method = peewee.TextField(null=True)
    body = peewee.TextField()

    class Meta:
        table_name = "fleet_records"
        indexes = ((("device_id", "kind", "received_at"), False), (("received_at",), False))


class Quarantined(FleetModel):
    """A message or record that failed: kept with the reason for an operator, never counted as data."""

    id = peewee.BigAutoField()
    msg_id = peewee.CharField(max_length=64, null=True)
    device_id = peewee.CharField(max_length=64, null=True)
    kind = peewee.CharField(max_length=16, null=True)
    topic = peewee.CharField(max_length=512)
    reason = peewee.CharField(max_length=32)
    detail = peewee.TextField()
    received_at = peewee.DoubleField()
    content = peewee.TextField()

    class Meta:
        table_name = "fleet_quarantine"
        indexes = ((("reason",), False), (("received_at",), False))


class Held(FleetModel):
    """A record waiting for its delegation certificate; verified and moved once the certificate arrives."""

    msg_id = peewee.CharField(max_length=64, primary_key=True)
    device_id = peewee.CharField(max_length=64)
    kind = peewee.CharField(max_length=16)
    thumbprint = peewee.CharField(max_length=64, index=True)
    topic = peewee.CharField(max_length=512)
    received_at = peewee.DoubleField()
    envelope = peewee.TextField()

    class Meta:
        table_name = "fleet_held"


class Certificate(FleetModel):
    """A delegation certificate, known to be issued by its device's key."""

    thumbprint = peewee.CharField(max_length=64, primary_key=True)
    device_id = peewee.CharField(max_length=64, index=True)
    pem = peewee.TextField()
    not_before = peewee.DoubleField()
    not_after = peewee.DoubleField()
    received_at = peewee.DoubleField()

    class Meta:
        table_name = "fleet_certificates"


class DeployEvent(FleetModel):
    """A device's deployment report (a verified ``deploy`` record, also in ``fleet_records``), queryable by column."""

    msg_id = peewee.CharField(max_length=64, primary_key=True)
    device_id = peewee.CharField(max_length=64)
    deployment_id = peewee.CharField(max_length=64, null=True)
    sequence = peewee.BigIntegerField(null=True)
    event = peewee.CharField(max_length=16, help_text="transition or refused")
    state = peewee.CharField(max_length=16, null=True)
    reason = peewee.TextField(null=True)
    model_id = peewee.CharField(max_length=64, null=True)
    version = peewee.CharField(max_length=64, null=True)
    at = peewee.DoubleField(help_text="when the device entered the state (its clock)")
    seq = peewee.BigIntegerField(help_text="the record's outbox sequence: orders one device's reports")
    received_at = peewee.DoubleField()

    class Meta:
        table_name = "fleet_deploy_events"
        indexes = ((("deployment_id", "device_id"), False), (("device_id", "seq"), False))


MODELS: list[type[FleetModel]] = [Record, Quarantined, Held, Certificate, DeployEvent]


def database_url(value: str) -> str:
    """A Peewee database URL: URLs pass through, anything else is the path of an SQLite file."""
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).resolve()}"


def open_database(url: str, *, create: bool = True) -> peewee.Database:
    """Connect to the fleet database at ``url`` (see :func:`database_url`), bind the models to it and, if
    ``create``, create any missing table. One fleet database per process: the models are bound globally."""
    url = database_url(url)
    options: dict[str, Any] = {}
    if url.startswith("sqlite"):
        path = Path(url.split(":///", 1)[1])
        if not create and not path.exists():
            raise ProvisioningError(f"no fleet database at {path}: run `fleet ingest` first, or give --db")
        path.parent.mkdir(parents=True, exist_ok=True)
        options = {"pragmas": SQLITE_PRAGMAS, "timeout": SQLITE_BUSY_TIMEOUT_S}
    database = connect(url, **options)
    database.bind(MODELS, bind_refs=False, bind_backrefs=False)
    if create:
        _create_tables(database)
    return database


def _create_tables(database: peewee.Database, attempts: int = 5) -> None:
    # Workers started together race on PostgreSQL's CREATE TABLE IF NOT EXISTS (a duplicate key in its
    # catalogue); whoever loses finds the tables there on the next attempt.
    for attempt in range(attempts):
        try:
            with database.connection_context():
                database.create_tables(MODELS, safe=True)
            return
        except (peewee.IntegrityError, peewee.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))

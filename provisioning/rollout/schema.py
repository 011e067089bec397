"""A rollout's durable state, in the ingest's database beside the devices' reports (``fleet_deploy_events``).

- ``fleet_deployments``: one row per rollout: its bundle, plan, state and why;
- ``fleet_deployment_devices``: one row per device of a rollout: its ring, the state it reached and why,
  its deadline, and where its rollback stands;
- ``fleet_deploy_documents``: every signed document the operator issued, by sequence (the device refuses a
  sequence not above the last it accepted, so sequences are allocated here, fleet-wide, and never reused).

Every decision is committed here before the document that carries it is published, so a ``fleet deploy``
killed at any point resumes (``fleet deploy --resume ID``) by publishing again what was not yet published.
"""

from __future__ import annotations

import time
from typing import Any

import peewee

from provisioning.ingest.schema import FleetModel, open_database

RUNNING = "running"
TERMINAL_ROLLOUT = ("completed", "rolled_back", "cancelled", "timed_out")


class Deployment(FleetModel):
    deployment_id = peewee.CharField(max_length=64, primary_key=True)
    bundle_id = peewee.CharField(max_length=160)
    rollback_bundle_id = peewee.CharField(max_length=160, null=True)
    plan = peewee.TextField(help_text="the RolloutPlan as JSON")
    state = peewee.CharField(max_length=16, help_text="running, aborted, completed, rolled_back, cancelled, timed_out")
    reason = peewee.TextField(null=True)
    ring = peewee.IntegerField(default=-1, help_text="the highest ring whose documents were issued")
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()
    complete_by = peewee.DoubleField()

    class Meta:
        table_name = "fleet_deployments"


class DeploymentDevice(FleetModel):
    deployment_id = peewee.CharField(max_length=64)
    device_id = peewee.CharField(max_length=64)
    ring = peewee.IntegerField()
    state = peewee.CharField(max_length=16, help_text="pending, sent, a state the device reported, or timed_out")
    reason = peewee.TextField(null=True)
    sequence = peewee.BigIntegerField(null=True, help_text="of the deploy document sent to it")
    sent_at = peewee.DoubleField(null=True)
    deadline_at = peewee.DoubleField(null=True)
    finished_at = peewee.DoubleField(null=True)
    rollback = peewee.CharField(max_length=16, null=True, help_text="none, sent, a reported state, unavailable")
    rollback_reason = peewee.TextField(null=True)
    rollback_sequence = peewee.BigIntegerField(null=True)
    rollback_deadline_at = peewee.DoubleField(null=True)

    class Meta:
        table_name = "fleet_deployment_devices"
        primary_key = peewee.CompositeKey("deployment_id", "device_id")


class IssuedDocument(FleetModel):
    sequence = peewee.BigIntegerField(primary_key=True)
    deployment_id = peewee.CharField(max_length=64, help_text="the rollout")
    document_id = peewee.CharField(max_length=64, help_text="the document's own deployment_id")
    device_id = peewee.CharField(max_length=64)
    purpose = peewee.CharField(max_length=16, help_text="deploy, rollback or cancel")
    topic = peewee.CharField(max_length=256)
    payload = peewee.TextField()
    issued_at = peewee.DoubleField()
    published = peewee.BooleanField(default=False)

    class Meta:
        table_name = "fleet_deploy_documents"
        indexes = ((("deployment_id", "published"), False),)


ROLLOUT_MODELS: list[type[FleetModel]] = [Deployment, DeploymentDevice, IssuedDocument]


def open_rollout_database(url: str, *, create: bool = True) -> peewee.Database:
    """The fleet database (see :func:`provisioning.ingest.schema.open_database`) with the rollout tables bound."""
    database = open_database(url, create=create)
    database.bind(ROLLOUT_MODELS, bind_refs=False, bind_backrefs=False)
    if create:
        with database.connection_context():
            for attempt in range(5):
                try:
                    database.create_tables(ROLLOUT_MODELS, safe=True)
                    break
                except (peewee.IntegrityError, peewee.ProgrammingError):
                    if attempt == 4:
                        raise
                    time.sleep(0.2 * (attempt + 1))
    return database


def transaction(database: peewee.Database) -> Any:
    """A write transaction; on SQLite it takes the write lock at BEGIN (see the ingest's store)."""
    if isinstance(database, peewee.SqliteDatabase):
        return database.atomic(lock_type="IMMEDIATE")
    return database.atomic()

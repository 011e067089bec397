"""``fleet status``: rollouts as the database and the devices' latest reports describe them (read only)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from agent.errors import ProvisioningError
from provisioning.ingest.schema import DeployEvent
from provisioning.rollout.plan import FAILED, FINISHED
from provisioning.rollout.rollout import refresh_devices
from provisioning.rollout.schema import Deployment, DeploymentDevice


def rollout_status(deployment_id: str, now: float | None = None) -> dict[str, Any]:
    """One rollout: its state, counts per device state, devices past their deadline, failures and each device."""
    now = time.time() if now is None else now
    deployment = Deployment.get_or_none(Deployment.deployment_id == deployment_id)
    if deployment is None:
        raise ProvisioningError(f"no deployment {deployment_id}")
    rows = list(DeploymentDevice.select().where(DeploymentDevice.deployment_id == deployment_id)
                .order_by(DeploymentDevice.ring, DeploymentDevice.device_id))  # fmt: skip
    refresh_devices(deployment, rows)  # in memory: a status taken while no `fleet deploy` runs is current too
    refusals = _unattributed_refusals([row for row in rows if row.sent_at is not None and row.state not in FINISHED])
    return {
        **_summary(deployment, rows),
        "rollback_bundle": deployment.rollback_bundle_id,
        "complete_by": deployment.complete_by,
        "past_deadline": [row.device_id for row in rows
                          if row.deadline_at is not None and row.state not in FINISHED and now > row.deadline_at],
        "failures": [{"device": row.device_id, "state": row.state, "reason": row.reason}
                     for row in rows if row.state in FAILED],
        "devices": [
            {"device": row.device_id, "ring": row.ring, "state": row.state, "reason": row.reason,
             "sequence": row.sequence, "sent_at": row.sent_at, "deadline_at": row.deadline_at,
             "rollback": row.rollback, "rollback_reason": row.rollback_reason,
             **({"refused": refusals[row.device_id]} if row.device_id in refusals else {})}
            for row in rows
        ],
    }  # fmt: skip


def _unattributed_refusals(waiting: list[DeploymentDevice]) -> dict[str, str]:
    """device -> the reason of its latest refusal since its document was sent, of a document that did not verify
    (a refusal that names no deployment: an untrusted key, an expired or unreadable document)."""
    found: dict[str, str] = {}
    for row in waiting:
        refusal = (DeployEvent.select()
                   .where((DeployEvent.device_id == row.device_id) & (DeployEvent.event == "refused")
                          & DeployEvent.deployment_id.is_null() & (DeployEvent.received_at >= row.sent_at))
                   .order_by(DeployEvent.seq.desc()).first())  # fmt: skip
        if refusal is not None:
            found[row.device_id] = refusal.reason or "refused"
    return found


def all_rollouts() -> list[dict[str, Any]]:
    """Every rollout, newest first, with its counts per device state."""
    result = []
    for deployment in Deployment.select().order_by(Deployment.created_at.desc()):
        rows = list(DeploymentDevice.select().where(DeploymentDevice.deployment_id == deployment.deployment_id))
        refresh_devices(deployment, rows)
        result.append(_summary(deployment, rows))
    return result


def _summary(deployment: Deployment, rows: list[DeploymentDevice]) -> dict[str, Any]:
    return {
        "deployment": deployment.deployment_id, "bundle": deployment.bundle_id, "state": deployment.state,
        "reason": deployment.reason, "ring": deployment.ring, "rings": max((row.ring for row in rows), default=-1) + 1,
        "created_at": deployment.created_at, "updated_at": deployment.updated_at,
        "counts": dict(sorted(Counter(row.state for row in rows).items())),
        "rollbacks": dict(sorted(Counter(row.rollback for row in rows if row.rollback).items())),
    }  # fmt: skip

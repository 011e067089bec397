"""Rules a verified deployment is held to on this device: its target, its requirements, its deadlines."""

from __future__ import annotations

import re

from agent.deploy.documents import BundleManifest, DeploymentDocument
from agent.deploy.journal import DeploymentRecord
from agent.errors import DeployError


def check_target(document: DeploymentDocument, topic_kind: str, device_id: str, groups: list[str]) -> None:
    """Refuse a document not addressed to this device (or arriving on another target's topic)."""
    target = document.target
    if target.device is not None and (target.device != device_id or topic_kind != "device"):
        raise DeployError(f"deployment {document.deployment_id} is for device {target.device}, not this one")
    if target.group is not None and (target.group not in groups or topic_kind != "group"):
        raise DeployError(f"deployment {document.deployment_id} is for group {target.group}, not one of {groups}")


def check_requirements(manifest: BundleManifest, *, runtime: str, agent_version: str) -> None:
    """Refuse a bundle this device cannot run: runtime, accelerator, agent version."""
    needs = manifest.requirements
    if runtime not in needs.runtimes:
        raise DeployError(f"bundle {manifest.bundle_id} needs runtime {' or '.join(needs.runtimes)}, this is {runtime}")
    if needs.accelerator == "gpu" and runtime != "litert":
        raise DeployError(f"bundle {manifest.bundle_id} needs the GPU accelerator, which {runtime} does not offer")
    if _version_key(agent_version) < _version_key(needs.min_agent_version):
        raise DeployError(
            f"bundle {manifest.bundle_id} needs agent {needs.min_agent_version} or later, this is {agent_version}"
        )


def overdue(record: DeploymentRecord, document: DeploymentDocument, now: float) -> str | None:
    """Why ``record`` has run out of time in its current state, or None (probation bounds itself)."""
    deadlines = document.deadlines
    if record.state in ("probation", "active"):
        return None
    if deadlines.complete_by is not None and now > deadlines.complete_by:
        return f"not complete by its deadline {deadlines.complete_by:.0f} (was {record.state})"
    step_limit = {
        "received": deadlines.verify_s,
        "verified": deadlines.download_s,
        "downloading": deadlines.download_s,
        "activating": deadlines.activate_s,
    }.get(record.state)
    if step_limit is not None and now - record.entered_at > step_limit:
        return f"step {record.state} took longer than {step_limit:.0f} s"
    return None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)

"""What the deployment state machine hands to activation once a bundle is verified and staged on disk.

These types are the narrow interface between the two halves of a deployment: ``agent.deploy`` fetches and
verifies (trust, documents, transfer, journal), ``agent.deploy.activation`` warms, swaps, watches and rolls back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from agent.models.catalog import ModelEntry


class ReferenceCase(BaseModel):
    """One reference input and the outputs the publisher measured for it; compared before activation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: dict[str, Any] = Field(description="tensor name -> nested list, as an `infer` request carries them")
    expected: dict[str, Any] = Field(description="output name -> nested list the publisher measured")
    tolerance: float = Field(1e-4, ge=0, description="largest absolute difference allowed per element")


class ProbationPolicy(BaseModel):
    """How long a newly activated version is watched and what fails it (from the deployment document)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: int | None = Field(50, ge=1, description="probation ends after this many answered requests...")
    seconds: float | None = Field(60.0, gt=0, description="...or after this long, whichever comes first")
    max_error_rate: float = Field(0.05, ge=0, le=1, description="fraction of failed requests that fails probation")
    max_latency_ratio: float | None = Field(
        None, gt=0, description="p50 latency against the previous version's above which probation fails; None: not checked"
    )


class StagedModel(BaseModel):
    """A verified bundle's model, complete on disk in the staging directory, ready to be warmed and swapped in."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    deployment_id: str
    model_id: str
    version: str
    file: Path = Field(description="the verified model file in the staging directory")
    entry: ModelEntry = Field(description="the manifest entry the bundle carries (its `file` is rewritten on install)")
    references: tuple[ReferenceCase, ...] = ()
    probation: ProbationPolicy = ProbationPolicy()


class ProbationVerdict(BaseModel):
    """Where a probation stands: still ``watching``, ``passed``, or ``failed`` with the reason reported upstream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state: Literal["watching", "passed", "failed"]
    reason: str | None = None
    requests: int = 0
    errors: int = 0


class PreviousVersion(BaseModel):
    """What was serving before an activation (None when the model is new): enough to roll back to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: str
    entry: ModelEntry | None = Field(description="the manifest entry that served before; None: the model was new")


class Activation(Protocol):
    """The activation half of a deployment, as the deployment state machine drives it.

    Every method is safe to call again after a crash and restart with the same arguments (the state machine
    resumes a journaled step by repeating it).
    """

    def warm(self, staged: StagedModel) -> None:
        """Build and allocate the new interpreter beside the serving one, within the memory budget, and run the
        reference cases; raises :class:`agent.errors.DeployError` with the reason if the model is refused."""

    def activate(self, staged: StagedModel) -> PreviousVersion:
        """Install the file and entry into ``models_dir`` and swap it in (in-flight requests finish on the old
        version); the previous version's file stays on disk. Returns what served before."""

    def probation(self, staged: StagedModel, since: float) -> ProbationVerdict:
        """The verdict so far for ``staged`` activated at monotonic time ``since`` (polled by the state machine)."""

    def roll_back(self, previous: PreviousVersion) -> None:
        """Serve ``previous`` again (or remove the model if it was new)."""

    def discard(self, staged: StagedModel) -> None:
        """Give up ``staged`` before it serves (superseded, cancelled, timed out): unload it if warmed, remove its
        installed copy; nothing if it already serves."""

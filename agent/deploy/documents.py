"""The signed documents of a deployment: the bundle manifest and the deployment document (pydantic models).

Both travel as a :class:`SignedEnvelope` (``{"payload": {...}, "signature": "<detached JWS>"}``), the JWS
computed over the JCS form of ``payload`` (see :mod:`agent.deploy.trust`). Times are POSIX seconds.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.deploy.staged import ProbationPolicy, ReferenceCase
from agent.models.catalog import ModelEntry

MAX_CHUNK_BYTES = 128 * 1024
SEGMENT = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SHA256_HEX = r"^[0-9a-f]{64}$"


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SignedEnvelope(Frozen):
    """A payload and the detached compact JWS (ES256) over its JCS bytes."""

    payload: dict[str, Any]
    signature: str


class BundleFile(Frozen):
    """One file of a bundle, fetched in chunks of ``chunk_size`` bytes (the last may be shorter)."""

    name: str = Field(pattern=SEGMENT)
    size: int = Field(ge=1)
    sha256: str = Field(pattern=SHA256_HEX)
    chunk_size: int = Field(ge=1, le=MAX_CHUNK_BYTES)
    chunks: tuple[str, ...] = Field(description="sha256 (hex) of each chunk, in order")

    @model_validator(mode="after")
    def _chunks_cover_the_file(self) -> BundleFile:
        expected = math.ceil(self.size / self.chunk_size)
        if len(self.chunks) != expected:
            raise ValueError(f"{self.name}: {self.size} bytes in chunks of {self.chunk_size} are {expected} chunks")
        for digest in self.chunks:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{self.name}: a chunk hash is not sha256 hex")
        return self

    def chunk_length(self, index: int) -> int:
        """Bytes in chunk ``index``."""
        return min(self.chunk_size, self.size - index * self.chunk_size)


class Requirements(Frozen):
    """What the device must offer to run the model."""

    runtimes: tuple[Literal["litert", "tflite-runtime"], ...] = ("litert", "tflite-runtime")
    accelerator: Literal["cpu", "gpu"] | None = None
    min_agent_version: str = "0"


class BundleManifest(Frozen):
    """What a release key vouches for: one model version, its files and how to check it before serving."""

    type: Literal["bundle"] = "bundle"
    model_id: str = Field(pattern=SEGMENT)
    version: str = Field(min_length=1, max_length=64)
    files: tuple[BundleFile, ...] = Field(min_length=1)
    entry: ModelEntry
    requirements: Requirements = Requirements()
    references: tuple[ReferenceCase, ...] = ()
    issued_at: float = Field(ge=0)
    expires: float = Field(ge=0)

    @model_validator(mode="after")
    def _entry_matches(self) -> BundleManifest:
        if self.entry.id != self.model_id or self.entry.version != self.version:
            raise ValueError("the manifest entry's id/version differ from the bundle's")
        if self.entry.file not in {f.name for f in self.files}:
            raise ValueError(f"the manifest entry's file {self.entry.file!r} is not among the bundle's files")
        if len({f.name for f in self.files}) != len(self.files):
            raise ValueError("two bundle files have the same name")
        return self

    @property
    def bundle_id(self) -> str:
        """``{model_id}@{version}``: how the file service knows the bundle."""
        return f"{self.model_id}@{self.version}"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, name: str) -> BundleFile:
        return next(f for f in self.files if f.name == name)


class Target(Frozen):
    """Whom a deployment document is for: one device or one group."""

    device: str | None = Field(None, pattern=SEGMENT)
    group: str | None = Field(None, pattern=SEGMENT)

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if (self.device is None) == (self.group is None):
            raise ValueError("a target names a device or a group, not both nor neither")
        return self


class Deadlines(Frozen):
    """Seconds each step may take (from entering it) and the absolute time by which the deployment must be done."""

    complete_by: float | None = Field(None, ge=0, description="POSIX time; unfinished then: timed_out")
    verify_s: float = Field(60.0, gt=0)
    download_s: float = Field(3600.0, gt=0)
    activate_s: float = Field(300.0, gt=0)


class DeploymentDocument(Frozen):
    """The desired state for a device or group; a higher ``sequence`` supersedes everything before it."""

    type: Literal["deployment"] = "deployment"
    deployment_id: str = Field(pattern=SEGMENT)
    target: Target
    action: Literal["deploy", "cancel"]
    bundle: SignedEnvelope | None = Field(None, description="the signed bundle manifest; required to deploy")
    activation: Literal["immediately", "maintenance_window"] = "immediately"
    probation: ProbationPolicy = ProbationPolicy()
    deadlines: Deadlines = Deadlines()
    sequence: int = Field(ge=0, le=2**53 - 1)
    issued_at: float = Field(ge=0)
    expires: float = Field(ge=0)

    @model_validator(mode="after")
    def _deploy_has_a_bundle(self) -> DeploymentDocument:
        if self.action == "deploy" and self.bundle is None:
            raise ValueError("a deploy document carries the signed bundle manifest")
        return self

"""Agent configuration: the pydantic v2 models of every section, with the built-in defaults and what each key
means. :mod:`agent.config_loader` fills them from a TOML file, a hardware profile and the environment. The
sections a hardware profile may set live in :mod:`agent.config_resources` and are importable from here too.

Unknown keys are errors (``extra="forbid"``): a misspelt key must not be silently ignored.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from importlib import resources
from datetime import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

# The whole configuration is importable from here: callers need not know which module holds a section.
from agent.config_resources import (
    INTERPRETER_MODULES,
    MESSAGE_CLASSES,
    PACKET_HEADROOM_BYTES,
    PROFILE_SECTIONS,
    AcceleratorChoice,
    InferenceSettings,
    Limits,
    MessageClass,
    OutboxSettings,
    RateLimit,
    RuntimeChoice,
    Section,
)

ENV_PREFIX = "EDGE_AGENT_"
# The bundled models, read-only package data (in a checkout, a link to the repository's models/).
BUNDLED_MODELS_DIR = Path(str(resources.files("agent") / "bundled_models"))
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DRAIN_LINGER_MS = 10.0  # the drain's rounds when every record leaves at once (batch = false)
BATCHED_DRAIN_LINGER_MS = 100.0  # ... and at most this when records wait for their batch


class TlsSettings(Section):
    """TLS material for a broker connection; files, because paho loads keys from files."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_skip_verify: bool = False


class LocalBroker(Section):
    """The device's own broker, where clients publish requests."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    tls: bool | TlsSettings = False
    keepalive: int = Field(30, ge=5, le=3600)
    session_expiry: int = Field(86400, ge=1, description="seconds the broker keeps our session offline")
    reconnect_min_s: float = Field(0.2, gt=0)
    reconnect_max_s: float = Field(10.0, gt=0)
    enforce_receive_maximum: bool = Field(
        False, description="cut off a broker that has more requests awaiting our acknowledgement than "
        "[limits] receive_maximum; off by default because mosquitto 2.0.11 moves every queued message into flight "
        "on any PUBACK, overshooting the window after a burst. A packet over [limits] max_packet_bytes, and a "
        "packet identifier reused before we acknowledged it, are refused either way"
    )


class CloudBroker(Section):
    """The upstream broker the outbox drains to; absent means local-only operation."""

    host: str
    port: int = Field(8883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    tls: bool | TlsSettings | None = None
    allow_plaintext: bool = False
    keepalive: int = Field(30, ge=5, le=3600)
    session_expiry: int = Field(86400, ge=1)
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(120.0, gt=0)
    fallback_models: list[str] = Field(default_factory=list)
    fallback_max_pending_bytes: int = Field(
        16 * 1024 * 1024, ge=65_536, description="request bytes (plus 512 each) held while waiting for the cloud's "
        "answers; beyond it new forwards are refused with -32001 and retry_after_ms"
    )
    fallback_max_answer_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="largest cloud answer relayed; larger ones are dropped unparsed "
        "(the request then gets -32007 at its deadline)"
    )
    max_packet_bytes: int = Field(
        4_259_840, ge=512, le=268_435_455, description="MQTT 5 Maximum Packet Size announced to the cloud broker, "
        "which must then not send a larger packet; unset: fallback_max_answer_bytes plus 64 KiB"
    )
    inflight_window: int = Field(32, ge=1, le=65535, description="QoS 1 publishes awaiting PUBACK at once")
    receive_maximum: int = Field(
        16, ge=1, le=65535, description="MQTT 5 Receive Maximum announced to the cloud broker: QoS 2 messages it "
        "may leave unreleased at once; a broker that exceeds it, or Maximum Packet Size, is disconnected"
    )
    batch: bool = Field(
        True, description="many records per cloud message (docs/cloud.md); false: one message per record"
    )
    batch_max_records: int = Field(100, ge=1, le=10_000, description="records in one batch message")
    batch_max_bytes: int = Field(
        65_536, ge=1024, le=16 * 1024 * 1024, description="JSON bytes of one batch before compression"
    )
    batch_linger_ms: float = Field(
        1000.0, ge=0, le=600_000, description="longest a record waits on the device for its batch to fill"
    )
    compression: Literal["zlib", "none"] = Field("zlib", description="of batch messages; single ones are plain")
    drain_linger_ms: float = Field(
        DRAIN_LINGER_MS, ge=0, le=1000, description="after a wake-up the drain waits this long for more rows and PUBACKs, "
        "so one outbox transaction claims or settles many records; never while a backlog drains or for a "
        "cloud-fallback request (0: off); unset with batch on: batch_linger_ms, within 10-100"
    )

    @model_validator(mode="after")
    def _drain_rounds_follow_batches(self) -> "CloudBroker":
        # Batched records wait for their batch anyway (up to batch_linger_ms): claiming them every 100 ms
        # instead of every 10 costs them nothing and spares the drain, the connection thread and the outbox
        # writer most of their rounds (about 10 us of CPU per reply at 32 in flight, BENCHMARKS.md).
        if "drain_linger_ms" not in self.model_fields_set and self.batch:
            self.drain_linger_ms = max(DRAIN_LINGER_MS, min(BATCHED_DRAIN_LINGER_MS, self.batch_linger_ms))
        return self

    @model_validator(mode="after")
    def _packet_size_follows_answers(self) -> "CloudBroker":
        if "max_packet_bytes" not in self.model_fields_set:
            self.max_packet_bytes = self.fallback_max_answer_bytes + PACKET_HEADROOM_BYTES
        return self

    @model_validator(mode="after")
    def _tls_required_off_loopback(self) -> "CloudBroker":
        if self.tls is None:
            self.tls = not _is_loopback(self.host)
        if self.tls is False and not _is_loopback(self.host) and not self.allow_plaintext:
            raise ValueError(
                f"cloud host {self.host!r} is not loopback: TLS is required (set tls = true, "
                "or allow_plaintext = true to accept sending over an unencrypted link)"
            )
        return self


class Replay(Section):
    """Answers kept so that a repeated request (same client, id and payload) is answered without re-running."""

    enabled: bool = True
    window_s: float = Field(300.0, gt=0, description="how long an answer is kept for repeats")
    max_bytes: int = Field(4 * 1024 * 1024, ge=0, description="reply bytes kept; the least recently used go first")


class MetricsSettings(Section):
    """What the agent reports about itself: the Prometheus endpoint and the health in its retained status."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535, description="0: any free port")
    health_interval_s: float = Field(60.0, gt=0, description="how often the retained status is refreshed")
    max_connections: int = Field(
        8, ge=1, le=1024, description="HTTP connections served at once (a thread each); more are closed on accept"
    )
    connection_timeout_s: float = Field(
        10.0, gt=0, le=600, description="a metrics connection idle this long is dropped, freeing its slot"
    )


WINDOW_PATTERN = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class MaintenanceWindow(BaseModel):
    """A daily stretch of local time, written ``"HH:MM-HH:MM"``; it may cross midnight (``"23:00-01:00"``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: time
    end: time

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        match = WINDOW_PATTERN.match(value.strip())
        if match is None:
            raise ValueError(f"{value!r} is not a window: write it as HH:MM-HH:MM in local time, e.g. \"02:00-04:00\"")
        start_h, start_m, end_h, end_m = (int(part) for part in match.groups())
        return {"start": time(start_h, start_m), "end": time(end_h, end_m)}

    @model_validator(mode="after")
    def _not_empty(self) -> MaintenanceWindow:
        if self.start == self.end:
            raise ValueError("a maintenance window must not start and end at the same minute")
        return self

    @model_serializer
    def _as_text(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


class DeploySettings(Section):
    """``[deploy]``: fleet model deployments over the cloud link (docs/deploy.md); needs ``[cloud]``."""

    trusted_keys: list[str] = Field(
        default_factory=list, description="release public keys (P-256 PEM text, or PEM file paths) that sign "
        "bundles and deployment documents; none: deployments are off"
    )
    root_key: str | None = Field(
        None, description="the root public key (PEM text or path) that signs key lists; unset: key lists refused"
    )
    groups: list[Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]] = Field(
        default_factory=list, description="the groups whose deployment documents apply here (topic segments)"
    )
    staging_budget_bytes: int = Field(
        256 * 1024 * 1024, ge=65_536, description="disk bytes staged bundles may use in data_dir/deploy/staging"
    )
    chunk_request_window: int = Field(8, ge=1, le=256, description="chunks requested and awaited at once")
    chunk_timeout_s: float = Field(10.0, gt=0, description="an unanswered chunk request is repeated after this")
    maintenance_window: MaintenanceWindow | None = Field(
        None,
        description="local time, \"HH:MM-HH:MM\" (may cross midnight): a deployment whose activation policy is "
        "maintenance_window is swapped in only inside it; unset: such deployments activate at once",
    )


class Signing(Section):
    # A device signs with its TPM by default; development setups choose "software" or "none" explicitly.
    backend: Literal["tpm", "software", "none"] = "tpm"
    tcti: str = "device:/dev/tpmrm0"
    handle: int = Field(0x81000010, ge=0x81000000, le=0x81FFFFFF, description="TPM persistent handle")
    owner_auth: str = ""
    key_file: Path | None = None
    mode: Literal["delegated", "strict"] = "delegated"
    rotate_minutes: float = Field(60.0, gt=0)
    tpm_timeout_s: float = Field(5.0, gt=0)
    certificate_header: Literal["x5c", "x5t#S256"] = Field(
        "x5c", description="embed the delegation certificate in each message, or only its SHA-256 thumbprint"
    )


class Settings(BaseSettings):
    """The whole effective configuration of one agent process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    device_id: str = Field(default_factory=lambda: default_device_id())
    profile: str = "default"
    data_dir: Path = Path("var/edge-agent")
    models_dir: Path | None = Field(
        None,
        description="the user's models (manifest.json and files), served with the bundled ones; an entry here "
        "replaces a bundled one with the same id. Unset: the bundled models alone",
    )
    models_poll_s: float = Field(
        2.0, ge=0, description="how often models_dir is checked for new model versions (hot updates); 0: never"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="auto: JSON lines unless stderr is a terminal (journald, containers, files)"
    )
    local: LocalBroker = Field(default_factory=LocalBroker)
    limits: Limits = Field(default_factory=Limits)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    replay: Replay = Field(default_factory=Replay)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    cloud: CloudBroker | None = None
    signing: Signing = Field(default_factory=Signing)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    deploy: DeploySettings = Field(default_factory=DeploySettings)

    @field_validator("device_id")
    @classmethod
    def _device_id_is_a_topic_segment(cls, value: str) -> str:
        if not re.match(DEVICE_ID_PATTERN, value):
            raise ValueError(
                f"{value!r} is not a usable device id: 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file (passed as init values) must lose to the environment, the reverse of the library default.
        return (env_settings, init_settings)


def default_device_id() -> str:
    """The host name, reduced to characters that are safe in an MQTT topic segment."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].strip("-.")
    return name or "edge-device"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

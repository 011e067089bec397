"""Agent configuration: the pydantic v2 models of every section, with the built-in defaults and what each key
means. :mod:`agent.config_loader` fills them from a TOML file, a hardware profile and the environment.

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

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator, model_serializer, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "EDGE_AGENT_"
# The bundled models, read-only package data (in a checkout, a link to the repository's models/).
BUNDLED_MODELS_DIR = Path(str(resources.files("agent") / "bundled_models"))
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


# Room in an MQTT packet for its topic and properties beside a payload at its limit.
PACKET_HEADROOM_BYTES = 65_536


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
        10.0, ge=0, le=1000, description="after a wake-up the drain waits this long for more rows and PUBACKs, "
        "so one outbox transaction claims or settles many records; never while a backlog drains (0: off)"
    )

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


class Limits(Section):
    """Request bounds, threads and the memory budget; hardware profiles set most of these."""

    max_payload_bytes: int = Field(1_048_576, ge=256)
    max_packet_bytes: int = Field(
        1_114_112, ge=512, le=268_435_455, description="MQTT 5 Maximum Packet Size announced to the local broker, "
        "which then drops a larger publish instead of sending it (the client gets no answer); unset: "
        "max_payload_bytes plus 64 KiB for topic and properties, so a request just over max_payload_bytes is "
        "still refused with an answer"
    )
    max_nesting_depth: int = Field(32, ge=2, le=512)
    max_input_elements: int = Field(1_000_000, ge=1)
    max_image_pixels: int = Field(
        16_777_216, ge=1, description="width x height of a picture sent to an image input, checked before decoding"
    )
    max_json_values: int = Field(
        2_004_096, ge=16, description="JSON values a request may hold, counted before parsing; "
        "unset: twice max_input_elements plus 4096 (an input at its limit beside others, and the envelope)"
    )
    intake_queue: int = Field(
        4096, ge=1, description="requests the agent holds waiting for a worker, across all clients "
        "(docs/protocol.md, Admission); beyond it, requests are shed from the client holding the most"
    )
    intake_max_bytes: int = Field(
        33_554_432, ge=65_536, description="payload bytes (plus 512 per request) the intake may hold"
    )
    refusal_replies_per_s: float = Field(
        10.0, gt=0, description="refusals answered per client and second; beyond them (and a burst of "
        "refusal_replies_burst) refused requests are acknowledged unanswered, so a flood cannot buy signed replies"
    )
    refusal_replies_burst: int = Field(20, ge=1)
    workers: int = Field(2, ge=1, le=64)
    inline_max_ms: float = Field(
        2.0, ge=0, le=1000, description="a small request for a loaded model whose runs average at most this "
        "long is served on the network thread while no worker is busy, saving the hand-off; 0: never"
    )
    inline_max_unread_bytes: int = Field(
        16_384, ge=0, description="inline serving stops while more request bytes than this wait unread on the "
        "local broker's socket: the network thread then reads ahead into the fair intake, because requests left "
        "waiting at the broker are served in its arrival order, whoever sent them"
    )
    num_threads: int = Field(1, ge=1, le=64)
    max_concurrent_inferences: int = Field(2, ge=1, le=64, description="unset: one per worker")
    model_memory_mb: int = Field(
        256, ge=1, description="measured memory all resident models may use; unset: half of process_memory_mb"
    )
    process_memory_mb: int = Field(512, ge=32, description="the agent's whole-process RSS ceiling")
    process_soft_limit_mb: int = Field(
        448, ge=16, description="RSS above which the agent sheds load; unset: 7/8 of process_memory_mb"
    )
    max_response_topic_bytes: int = Field(256, ge=16, le=65535)
    max_correlation_data_bytes: int = Field(128, ge=1, le=65535)
    receive_maximum: int = Field(
        65535, ge=1, le=65535, description="QoS 1 requests the broker may send ahead of the oldest one the agent "
        "has not acknowledged. PUBACKs go out in arrival order, so this window also spans every request answered "
        "or shed after the oldest one still waiting: the maximum keeps the agent reading (and shedding a "
        "flooder's excess) instead of leaving other clients' requests at the broker; each costs ~100 bytes"
    )
    drain_timeout_s: float = Field(10.0, ge=0)

    @model_validator(mode="after")
    def _budgets_nest(self) -> "Limits":
        # Unset dependent bounds follow the ones they depend on, so lowering process_memory_mb or workers
        # alone is enough; the defaults above are what these rules give for the default 512 MB and 2 workers.
        if "max_concurrent_inferences" not in self.model_fields_set:
            self.max_concurrent_inferences = self.workers
        if "process_soft_limit_mb" not in self.model_fields_set:
            self.process_soft_limit_mb = self.process_memory_mb * 7 // 8
        if "model_memory_mb" not in self.model_fields_set:
            self.model_memory_mb = self.process_memory_mb // 2
        if "max_packet_bytes" not in self.model_fields_set:
            self.max_packet_bytes = self.max_payload_bytes + PACKET_HEADROOM_BYTES
        if self.max_packet_bytes <= self.max_payload_bytes:
            raise ValueError(
                f"max_packet_bytes ({self.max_packet_bytes}) must exceed max_payload_bytes ({self.max_payload_bytes}): "
                "a packet carries its topic and properties besides the payload"
            )
        if "max_json_values" not in self.model_fields_set:
            self.max_json_values = self.max_input_elements * 2 + 4096
        # Each bound must leave room under the next one, or the agent would shed load (or be over its
        # ceiling) just by holding its models, and extra concurrency beyond the workers could never be used.
        if self.process_soft_limit_mb >= self.process_memory_mb:
            raise ValueError(
                f"process_soft_limit_mb ({self.process_soft_limit_mb}) must be below "
                f"process_memory_mb ({self.process_memory_mb})"
            )
        if self.model_memory_mb >= self.process_soft_limit_mb:
            raise ValueError(
                f"model_memory_mb ({self.model_memory_mb}) must be below "
                f"process_soft_limit_mb ({self.process_soft_limit_mb})"
            )
        if self.max_concurrent_inferences > self.workers:
            raise ValueError(
                f"max_concurrent_inferences ({self.max_concurrent_inferences}) cannot exceed "
                f"workers ({self.workers}): each inference runs on a worker"
            )
        return self


class RateLimit(Section):
    """Optional hard caps on incoming requests (token buckets: one per client, one shared by all clients).

    Off by default: the fair intake already shares the device between clients and lets a lone client use
    all of it. Turn them on for a contract ("no client above N requests/s"), not for protection.
    """

    enabled: bool = False
    requests_per_s: float = Field(20.0, gt=0, description="sustained rate allowed to one client")
    burst: int = Field(40, ge=1, description="requests one client may send at once after being idle")
    global_requests_per_s: float = Field(100.0, gt=0, description="sustained rate across all clients")
    max_clients: int = Field(4096, ge=1, description="clients tracked at once; the longest idle is forgotten")


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


MessageClass = Literal["res", "telemetry", "audit", "fallback", "deploy"]
MESSAGE_CLASSES: tuple[MessageClass, ...] = ("res", "telemetry", "audit", "fallback", "deploy")


class OutboxSettings(Section):
    """Bounds and durability of the outbox (``data_dir/outbox.db``); policies are documented in agent/upstream/outbox.py."""

    max_bytes: int = Field(64 * 1024 * 1024, ge=4096, description="body bytes kept before classes are dropped")
    max_messages: int = Field(100_000, ge=1)
    max_file_bytes: int | None = Field(None, ge=65536, description="hard ceiling on the database file itself")
    reserve_bytes: int = Field(
        4 * 1024 * 1024, ge=0, description="disk space held in outbox.db.reserve and given back when the disk is "
        "full, so the outbox can still deliver and checkpoint; its WAL stays under half of it (0: no reserve)"
    )
    ttl_s: dict[MessageClass, PositiveFloat] = Field(
        default_factory=lambda: {"fallback": 30.0}, description="per class; a class without one never expires"
    )
    batch_max: int = Field(512, ge=1, le=100_000, description="writes folded into one transaction and fsync")
    commit_interval_ms: float = Field(0.0, ge=0, le=1000, description="extra wait to fill a group commit")
    dead_letter_retry_s: float = Field(60.0, gt=0, description="first retry delay of a refused message")
    dead_letter_retry_max_s: float = Field(3600.0, gt=0)
    dead_letter_max_attempts: int = Field(5, ge=1, description="refusals before a message waits for an operator")


RuntimeChoice = Literal["auto", "litert", "tflite-runtime"]
# The module holding each runtime's Interpreter and load_delegate; "auto" tries them in this order.
INTERPRETER_MODULES = {"litert": "ai_edge_litert.interpreter", "tflite-runtime": "tflite_runtime.interpreter"}
AcceleratorChoice = Literal["cpu", "gpu"]


class InferenceSettings(Section):
    """``[inference]``: which TFLite runtime runs the models, and on what hardware by default."""

    runtime: RuntimeChoice = Field(
        "auto", description="auto: LiteRT (ai-edge-litert), else tflite-runtime (32-bit Raspberry Pi OS)"
    )
    accelerator: AcceleratorChoice = Field(
        "cpu",
        description="for models whose manifest entry names neither an accelerator nor a delegate: cpu (XNNPACK) "
        "or gpu (LiteRT's GPU accelerator, WebGPU over Vulkan; LiteRT only); the profiles set it per board",
    )
    required: bool = Field(
        False,
        description="a model whose accelerator (gpu or delegate) is missing or refuses it stops the agent at start "
        "instead of being served on CPU",
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


# The sections a hardware profile may set: the resources a board has, not where it connects or who it is.
PROFILE_SECTIONS: dict[str, type[Section]] = {
    "limits": Limits, "rate_limit": RateLimit, "outbox": OutboxSettings, "inference": InferenceSettings
}


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

"""The configuration sections a hardware profile may set: the resources a board has (``[limits]``,
``[rate_limit]``, ``[outbox]``, ``[inference]``), not where it connects or who it is; with :class:`Section`, the
base of every section. :mod:`agent.config` assembles them with the rest into the whole settings, and
:mod:`agent.profiles` reads them from the profile files.

Unknown keys are errors (``extra="forbid"``): a misspelt key must not be silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator


# Room in an MQTT packet for its topic and properties beside a payload at its limit.
PACKET_HEADROOM_BYTES = 65_536


class Section(BaseModel):
    """A table of the configuration: every key documented, none unknown."""

    model_config = ConfigDict(extra="forbid")


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


# The sections a hardware profile may set: the resources a board has, not where it connects or who it is.
PROFILE_SECTIONS: dict[str, type[Section]] = {
    "limits": Limits, "rate_limit": RateLimit, "outbox": OutboxSettings, "inference": InferenceSettings
}

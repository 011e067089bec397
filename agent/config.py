"""Agent configuration: pydantic v2 models loaded from a TOML file, a hardware profile and the environment.

Precedence, highest first: environment (``EDGE_AGENT_`` prefix, ``__`` between nesting levels, e.g.
``EDGE_AGENT_LOCAL__PORT=1884``), the config file, the hardware profile, the built-in defaults below.
Unknown keys are errors that name the key and the file they came from.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from agent.errors import ConfigError
from agent.profiles import BUILTIN_PROFILE, Profile, resolve_profile

ENV_PREFIX = "EDGE_AGENT_"
REPO_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
BUILTIN_SOURCE = "built-in default"
SECRET_KEYS = frozenset({"password", "owner_auth"})
_ENVIRONMENT = "environment"


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
    inflight_window: int = Field(32, ge=1, le=65535, description="QoS 1 publishes awaiting PUBACK at once")
    batch: bool = Field(False, description="many records per cloud message, for metered links (docs/cloud.md)")
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
    max_nesting_depth: int = Field(32, ge=2, le=512)
    max_input_elements: int = Field(1_000_000, ge=1)
    max_json_values: int = Field(
        2_004_096, ge=16, description="JSON values a request may hold, counted before parsing; "
        "unset: twice max_input_elements plus 4096 (an input at its limit beside others, and the envelope)"
    )
    intake_queue: int = Field(64, ge=1)
    workers: int = Field(2, ge=1, le=64)
    inline_max_ms: float = Field(
        2.0, ge=0, le=1000, description="a small request for a loaded model whose runs average at most this "
        "long is served on the network thread while no worker is busy, saving the hand-off; 0: never"
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
    receive_maximum: int = Field(256, ge=1, le=65535)
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
    """Token buckets on incoming requests: one per client, one shared by all clients."""

    enabled: bool = True
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


MessageClass = Literal["res", "telemetry", "audit", "fallback"]
MESSAGE_CLASSES: tuple[MessageClass, ...] = ("res", "telemetry", "audit", "fallback")


class OutboxSettings(Section):
    """Bounds and durability of the outbox (``data_dir/outbox.db``); policies are documented in agent/upstream/outbox.py."""

    max_bytes: int = Field(64 * 1024 * 1024, ge=4096, description="body bytes kept before classes are dropped")
    max_messages: int = Field(100_000, ge=1)
    max_file_bytes: int | None = Field(None, ge=65536, description="hard ceiling on the database file itself")
    ttl_s: dict[MessageClass, PositiveFloat] = Field(
        default_factory=lambda: {"fallback": 30.0}, description="per class; a class without one never expires"
    )
    batch_max: int = Field(512, ge=1, le=100_000, description="writes folded into one transaction and fsync")
    commit_interval_ms: float = Field(0.0, ge=0, le=1000, description="extra wait to fill a group commit")
    dead_letter_retry_s: float = Field(60.0, gt=0, description="first retry delay of a refused message")
    dead_letter_retry_max_s: float = Field(3600.0, gt=0)
    dead_letter_max_attempts: int = Field(5, ge=1, description="refusals before a message waits for an operator")


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
    models_dir: Path = REPO_MODELS_DIR
    models_poll_s: float = Field(
        2.0, ge=0, description="how often models_dir is checked for new model versions (hot updates); 0: never"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="auto: JSON lines unless stderr is a terminal (journald, containers, files)"
    )
    local: LocalBroker = Field(default_factory=LocalBroker)
    limits: Limits = Field(default_factory=Limits)
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    replay: Replay = Field(default_factory=Replay)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    cloud: CloudBroker | None = None
    signing: Signing = Field(default_factory=Signing)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)

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
PROFILE_SECTIONS: dict[str, type[Section]] = {"limits": Limits, "rate_limit": RateLimit, "outbox": OutboxSettings}


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


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning I/O and syntax errors into a :class:`ConfigError` naming the file."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:  # tomllib decodes without catching
        raise ConfigError(f"{path}: {exc}") from None


def _describe(error: dict[str, Any], origin: str) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{origin}: unknown key {key!r}"
    return f"{origin}: {key}: {error['msg']}"


class EffectiveConfig(NamedTuple):
    """The loaded settings, the source of every leaf value (dotted key -> source), and the profile applied."""

    settings: Settings
    sources: dict[str, str]
    profile: Profile | None


def load_settings(
    path: Path | str | None = None, overrides: dict[str, Any] | None = None, *, system_root: Path = Path("/")
) -> Settings:
    """Load the effective configuration from ``path`` (optional), its profile, the environment and ``overrides``.

    ``overrides`` stand in for file values (tests and the demo use them); the environment still wins.
    ``system_root`` is where ``profile = "auto"`` reads the board's ``/proc``, ``/sys`` and ``/etc``.
    """
    return load_settings_with_sources(path, overrides, system_root=system_root).settings


def load_settings_with_sources(
    path: Path | str | None = None, overrides: dict[str, Any] | None = None, *, system_root: Path = Path("/")
) -> EffectiveConfig:
    """Like :func:`load_settings`, also saying where each value came from and which profile was applied."""
    file_path = Path(path) if path else None
    given: list[tuple[str, dict[str, Any]]] = []  # (source, values), lowest precedence first
    if file_path:
        given.append((str(file_path), read_toml(file_path)))
    if overrides:
        given.append(("overrides", overrides))
    environment = _environment_layers()
    profile = _requested_profile([*given, *environment], file_path, system_root)
    if profile is not None:
        given.insert(0, (profile.label, profile.values))
    values: dict[str, Any] = {}
    for _, layer in given:
        values = _deep_merge(values, layer)
    # Settings reads the environment itself, above these values; it is a layer here only for provenance.
    layers = [*given, *environment]
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        lines = [_describe(err, _origin_of(tuple(err["loc"]), layers)) for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    leaves = _leaves(settings.model_dump(mode="json"))
    sources = {".".join(key): _winning_source(key, layers) or BUILTIN_SOURCE for key in leaves}
    return EffectiveConfig(settings, sources, profile)


def _environment_layers() -> list[tuple[str, dict[str, Any]]]:
    """One layer per ``EDGE_AGENT_`` variable, as pydantic-settings reads it; nested names override JSON."""
    try:
        parsed = EnvSettingsSource(Settings)()
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration:\n  {_ENVIRONMENT}: {exc}") from None
    found = []
    for name in os.environ:
        if name.upper().startswith(ENV_PREFIX):
            key = tuple(name[len(ENV_PREFIX) :].lower().split("__"))
            node = _lookup(parsed, key)
            if node is not _MISSING:
                layer: Any = node
                for part in reversed(key):
                    layer = {part: layer}
                found.append((len(key), f"{_ENVIRONMENT} {name}", layer))
    return [(source, layer) for _, source, layer in sorted(found, key=lambda item: item[:2])]


def _requested_profile(layers: list[tuple[str, dict[str, Any]]], file_path: Path | None, root: Path) -> Profile | None:
    source, requested = next(
        ((source, layer["profile"]) for source, layer in reversed(layers) if "profile" in layer),
        (BUILTIN_SOURCE, BUILTIN_PROFILE),
    )
    if not isinstance(requested, str):
        raise ConfigError(
            f"invalid configuration:\n  {source}: profile: must be a string: 'auto', 'default', "
            "a profile name or a path to a TOML file"
        )
    # A relative path to the user's own profile is relative to the config file that names it.
    base_dir = file_path.parent if file_path and source == str(file_path) else None
    try:
        return resolve_profile(requested, PROFILE_SECTIONS, root=root, base_dir=base_dir)
    except ConfigError as exc:
        raise ConfigError(f"{source} sets profile = {requested!r}: {exc}") from None


_MISSING = object()


def _lookup(values: Any, key: tuple[Any, ...]) -> Any:
    """The value at ``key``; a scalar or list met on the way covers everything below it."""
    node = values
    for part in key:
        if not isinstance(node, dict):
            return node
        if part not in node:
            return _MISSING
        node = node[part]
    return node


def _leaves(values: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    keys: list[tuple[str, ...]] = []
    for name, value in values.items():
        if isinstance(value, dict) and value:
            keys.extend(_leaves(value, (*prefix, name)))
        else:
            keys.append((*prefix, name))
    return keys


def _winning_source(key: tuple[Any, ...], layers: list[tuple[str, dict[str, Any]]]) -> str | None:
    return next((source for source, layer in reversed(layers) if _lookup(layer, key) is not _MISSING), None)


def _origin_of(loc: tuple[Any, ...], layers: list[tuple[str, dict[str, Any]]]) -> str:
    """Where the values behind a validation error came from, widening to the enclosing table if needed.

    A cross-field error sits on a whole table and a union error has member names appended to the key, so
    every source that set something under the failing key is named, highest precedence first.
    """
    for depth in range(len(loc), 0, -1):
        prefix = loc[:depth]
        keys: set[tuple[Any, ...]] = set()
        for _, layer in layers:
            node = _lookup(layer, prefix)
            if isinstance(node, dict):
                keys.update((*prefix, *leaf) for leaf in _leaves(node))
            elif node is not _MISSING:
                keys.add(prefix)
        found = {_winning_source(key, layers) for key in keys}
        named = [source for source, _ in reversed(layers) if source in found]
        if named:
            return ", ".join(named)
    return BUILTIN_SOURCE


def describe_effective_config(effective: EffectiveConfig) -> str:
    """A readable table of every effective value and its source, headed by the profile and why it applies.

    Passwords and TPM authorisation values are redacted.
    """
    settings, sources, profile = effective
    asked_by = sources.get("profile", BUILTIN_SOURCE)
    if profile is None:
        head = [f"profile: {BUILTIN_PROFILE}, the built-in defaults without a profile file"]
        if asked_by != BUILTIN_SOURCE:
            head[0] += f", named by {asked_by}"
    elif profile.reason is not None:
        head = [f"profile: {profile.name} ({profile.path}), detected because {asked_by} asks for 'auto'"]
        head += [f"  {profile.reason}", f"  {profile.description}"]
    else:
        head = [f"profile: {profile.name} ({profile.path}), named by {asked_by}", f"  {profile.description}"]
    dumped = settings.model_dump(mode="json")
    rows = [("key", "value", "source")]
    for key in _leaves(dumped):
        value = _lookup(dumped, key)
        secret = key[-1] in SECRET_KEYS and value not in (None, "")
        rows.append((".".join(key), "<redacted>" if secret else json.dumps(value), sources[".".join(key)]))
    widths = [max(len(row[column]) for row in rows) for column in (0, 1)]
    table = [f"{key:<{widths[0]}}  {value:<{widths[1]}}  {source}" for key, value, source in rows]
    return "\n".join([*head, "", *table])


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged

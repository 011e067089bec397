"""Agent configuration: pydantic v2 models loaded from a TOML file, a hardware profile and the environment.

Precedence, highest first: environment (``EDGE_AGENT_`` prefix, ``__`` between nesting levels, e.g.
``EDGE_AGENT_LOCAL__PORT=1884``), the config file, the hardware profile, the built-in defaults below.
Unknown keys are errors that name the key and the file they came from.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.errors import ConfigError

ENV_PREFIX = "EDGE_AGENT_"
REPO_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


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
    max_payload_bytes: int = Field(1_048_576, ge=256)
    max_nesting_depth: int = Field(32, ge=2, le=512)
    max_input_elements: int = Field(1_000_000, ge=1)
    intake_queue: int = Field(64, ge=1)
    workers: int = Field(2, ge=1, le=64)
    num_threads: int = Field(1, ge=1, le=64)
    max_response_topic_bytes: int = Field(256, ge=16, le=65535)
    max_correlation_data_bytes: int = Field(128, ge=1, le=65535)
    receive_maximum: int = Field(256, ge=1, le=65535)
    drain_timeout_s: float = Field(10.0, ge=0)


class Signing(Section):
    backend: Literal["tpm", "software", "none"] = "none"
    tcti: str = "device:/dev/tpmrm0"
    handle: int = 0x81000010
    owner_auth: str = ""
    key_file: Path | None = None
    mode: Literal["delegated", "strict"] = "delegated"
    rotate_minutes: float = Field(60.0, gt=0)
    tpm_timeout_s: float = Field(5.0, gt=0)


class Settings(BaseSettings):
    """The whole effective configuration of one agent process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    device_id: str = Field(default_factory=lambda: default_device_id())
    profile: str = "default"
    data_dir: Path = Path("var/edge-agent")
    models_dir: Path = REPO_MODELS_DIR
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    local: LocalBroker = Field(default_factory=LocalBroker)
    limits: Limits = Field(default_factory=Limits)
    cloud: CloudBroker | None = None
    signing: Signing = Field(default_factory=Signing)

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


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning I/O and syntax errors into a :class:`ConfigError` naming the file."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _describe(error: dict[str, Any], origin: str) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{origin}: unknown key {key!r}"
    return f"{origin}: {key}: {error['msg']}"


def _origin_of(loc: tuple[Any, ...], file_values: dict[str, Any], path: Path | None) -> str:
    env_name = ENV_PREFIX + "__".join(str(part) for part in loc).upper()
    if env_name in os.environ:
        return f"environment {env_name}"
    node: Any = file_values
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return "built-in defaults"
        node = node[part]
    return str(path) if path else "config"


def load_settings(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load the effective configuration from ``path`` (optional), the environment and ``overrides``.

    ``overrides`` stand in for file values (tests and the demo use them); the environment still wins.
    """
    file_path = Path(path) if path else None
    file_values = read_toml(file_path) if file_path else {}
    values = _deep_merge(file_values, overrides or {})
    try:
        return Settings(**values)
    except ValidationError as exc:
        lines = [_describe(err, _origin_of(tuple(err["loc"]), values, file_path)) for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged

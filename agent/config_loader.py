"""Where the effective configuration comes from: the config file, its hardware profile, the environment and
explicit overrides, merged key by key with the source of every value kept (``edge-agent check-config``).

Precedence, highest first: environment (``EDGE_AGENT_`` prefix, ``__`` between nesting levels, e.g.
``EDGE_AGENT_LOCAL__PORT=1884``), the config file (or overrides standing in for it), the hardware profile,
the built-in defaults in :mod:`agent.config`. Unknown keys are errors that name the key and where it came
from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError
from pydantic_settings import EnvSettingsSource, SettingsError

from agent.compat import tomllib
from agent.config import ENV_PREFIX, PROFILE_SECTIONS, Settings
from agent.errors import ConfigError
from agent.profiles import BUILTIN_PROFILE, Profile, resolve_profile

BUILTIN_SOURCE = "built-in default"
SECRET_KEYS = frozenset({"password", "owner_auth"})
_ENVIRONMENT = "environment"


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

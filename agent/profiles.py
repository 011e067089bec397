"""Hardware profiles: per-board resource settings, found by name or path, and board auto-detection.

A profile is a TOML file holding the resource sections of the configuration (``[limits]``,
``[rate_limit]``, ``[outbox]``, ``[inference]``: the default accelerator) under the same key names, plus a ``[profile]`` table with a
``description``. Its values sit between the built-in defaults and the config file: the file and the
environment override them key by key. ``profile = "default"`` means no profile file at all.

Named profiles are the package data ``agent/firmware_profiles`` (in a checkout, a link to the repository's
``firmware_profiles/``; in the wheel, a copy); any reference containing a ``/`` or ending in ``.toml`` is a
path to the user's own file, relative to the config file's directory.

``profile = "auto"`` picks one from what the board reports. The rules live here in code rather than in
the TOML files because they compare several sources at once and need to be tested as a whole:

* ``/etc/nv_tegra_release`` exists, or the device-tree model names a Jetson: ``jetson-nano``;
* the device-tree model (``/proc/device-tree/model`` or ``/sys/firmware/devicetree/base/model``)
  names a Raspberry Pi 5 (or Compute Module 5): ``rpi5``; a Pi 4, Pi 400 or Compute Module 4: ``rpi4-4gb``;
* any other device-tree board: ``rpi4-4gb``, the mid-sized profile; no device tree at all (a PC or
  server): ``x86-generic``;
* whatever the board, below 3 GiB of ``MemTotal`` (or when it cannot be read) the smallest profile,
  ``rpi4-1gb``, because a profile sized for more memory would push the agent into the OOM killer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.compat import tomllib
from agent.errors import ConfigError

# Wheels install unpacked, so the package data is a plain directory.
BUNDLED_PROFILES_DIR = Path(str(resources.files("agent") / "firmware_profiles"))
PROFILE_DIRS: tuple[Path, ...] = (BUNDLED_PROFILES_DIR,)
BUILTIN_PROFILE = "default"
AUTO_PROFILE = "auto"
SMALLEST_PROFILE = "rpi4-1gb"
SMALL_MEMORY_BYTES = 3 * 1024**3
PROFILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_META_TABLE = "profile"


class ProfileMeta(BaseModel):
    """The ``[profile]`` table: what the profile is for, shown by ``edge-agent check-config``."""

    model_config = ConfigDict(extra="forbid")

    description: str


@dataclass(frozen=True)
class Detection:
    """The profile auto-detection chose, and a sentence saying why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Profile:
    """A loaded, validated profile: its settings as written in the file, without the ``[profile]`` table."""

    name: str
    path: Path
    description: str
    values: dict[str, Any]
    reason: str | None = None

    @property
    def label(self) -> str:
        """How provenance and error messages name this profile."""
        return f"profile {self.name} ({self.path})"


def is_profile_path(reference: str) -> bool:
    """Whether ``reference`` names a file (the user's own profile) rather than a shipped profile."""
    return "/" in reference or reference.endswith(".toml")


def available_profiles(search_dirs: tuple[Path, ...] = PROFILE_DIRS) -> list[str]:
    """Names of the profiles found in ``search_dirs``, sorted."""
    return sorted({path.stem for folder in search_dirs if folder.is_dir() for path in folder.glob("*.toml")})


def find_profile(reference: str, *, search_dirs: tuple[Path, ...] = PROFILE_DIRS, base_dir: Path | None = None) -> Path:
    """The file a profile reference points to: a path (relative to ``base_dir``) or a shipped name."""
    if is_profile_path(reference):
        try:
            path = Path(reference).expanduser()
        except RuntimeError:  # "~name/...": pathlib cannot find that user's home
            raise ConfigError(f"profile file {reference!r}: no home directory for that user") from None
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"profile file {path} does not exist")
        return path
    if not re.match(PROFILE_NAME_PATTERN, reference):
        raise ConfigError(f"{reference!r} is not a profile name or a path to a profile file")
    for folder in search_dirs:
        candidate = folder / f"{reference}.toml"
        if candidate.is_file():
            return candidate
    known = ", ".join([AUTO_PROFILE, BUILTIN_PROFILE, *available_profiles(search_dirs)])
    searched = ", ".join(str(folder) for folder in search_dirs)
    raise ConfigError(
        f"unknown profile {reference!r}: known profiles are {known} (searched {searched}); "
        "a path to your own TOML file works too"
    )


def load_profile(
    reference: str,
    sections: Mapping[str, type[BaseModel]],
    *,
    search_dirs: tuple[Path, ...] = PROFILE_DIRS,
    base_dir: Path | None = None,
    reason: str | None = None,
) -> Profile:
    """Find, read and validate a profile; every section in it must be one of ``sections``.

    Errors name the key and the profile file: unknown sections or keys, wrong types, out-of-range values.
    """
    path = find_profile(reference, search_dirs=search_dirs, base_dir=base_dir)
    name = path.stem
    label = f"profile {name} ({path})"
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:  # tomllib decodes without catching
        raise ConfigError(f"{label}: {exc}") from None
    problems: list[str] = []
    meta = _validate_table(ProfileMeta, _META_TABLE, raw.get(_META_TABLE), label, problems)
    values = {key: value for key, value in raw.items() if key != _META_TABLE}
    allowed = ", ".join(f"[{section}]" for section in sorted(sections))
    for key, value in values.items():
        if key not in sections:
            problems.append(f"{label}: unknown key {key!r} (a profile may set only {allowed})")
        else:
            _validate_table(sections[key], key, value, label, problems)
    if problems or not isinstance(meta, ProfileMeta):
        raise ConfigError("invalid profile:\n  " + "\n  ".join(problems))
    return Profile(name=name, path=path, description=meta.description, values=values, reason=reason)


def _validate_table(model: type[BaseModel], key: str, value: Any, label: str, problems: list[str]) -> BaseModel | None:
    if value is None:
        problems.append(f"{label}: missing table [{key}]")
        return None
    if not isinstance(value, dict):
        problems.append(f"{label}: {key} must be a table ([{key}]), not {type(value).__name__}")
        return None
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in (key, *error["loc"]))
            if error["type"] == "extra_forbidden":
                problems.append(f"{label}: unknown key {where!r}")
            else:
                problems.append(f"{label}: {where}: {error['msg']}")
        return None


def resolve_profile(
    requested: str,
    sections: Mapping[str, type[BaseModel]],
    *,
    root: Path = Path("/"),
    search_dirs: tuple[Path, ...] = PROFILE_DIRS,
    base_dir: Path | None = None,
) -> Profile | None:
    """The profile ``requested`` stands for: ``None`` for ``"default"``, detected for ``"auto"``, else loaded."""
    if requested == BUILTIN_PROFILE:
        return None
    if requested == AUTO_PROFILE:
        detection = detect_profile(root)
        return load_profile(detection.name, sections, search_dirs=search_dirs, reason=detection.reason)
    return load_profile(requested, sections, search_dirs=search_dirs, base_dir=base_dir)


def detect_profile(root: Path = Path("/")) -> Detection:
    """Choose a shipped profile from the board found under ``root`` (``/`` on a real device)."""
    model, model_file = _device_tree_model(root)
    tegra_file = root / "etc/nv_tegra_release"
    tegra = _first_line(tegra_file)
    memory = _mem_total_bytes(root / "proc/meminfo")
    lowered = (model or "").lower()
    if tegra is not None or "jetson" in lowered:
        evidence = f"{tegra_file} says {tegra!r}" if tegra is not None else f"{model_file} says {model!r}"
        board, preferred = f"an NVIDIA Jetson ({evidence})", "jetson-nano"
    elif "raspberry pi 5" in lowered or "compute module 5" in lowered:
        board, preferred = f"a {model} ({model_file})", "rpi5"
    elif "raspberry pi 4" in lowered or "compute module 4" in lowered:
        board, preferred = f"a {model} ({model_file})", "rpi4-4gb"
    elif model:
        board, preferred = f"a board with no profile of its own, {model!r} ({model_file})", "rpi4-4gb"
    else:
        board, preferred = "a machine without a device tree, so a PC or server", "x86-generic"
    if memory is None:
        return Detection(
            SMALLEST_PROFILE,
            f"Found {board}, but no MemTotal in {root / 'proc/meminfo'}: "
            f"chose the smallest profile, {SMALLEST_PROFILE}, to stay safe.",
        )
    amount = f"{memory / 1024**3:.1f} GiB of memory"
    if memory < SMALL_MEMORY_BYTES and preferred != SMALLEST_PROFILE:
        return Detection(
            SMALLEST_PROFILE,
            f"Found {board} with {amount}: below 3 GiB, so the smallest profile, {SMALLEST_PROFILE}, "
            f"rather than {preferred}.",
        )
    return Detection(preferred, f"Found {board} with {amount}: chose {preferred}.")


def _device_tree_model(root: Path) -> tuple[str | None, Path | None]:
    # /proc/device-tree is a symlink to /sys/firmware/devicetree/base; either may be missing in containers.
    for path in (root / "proc/device-tree/model", root / "sys/firmware/devicetree/base/model"):
        try:
            text = path.read_bytes().rstrip(b"\x00").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if text:
            return text, path
    return None, None


def _first_line(path: Path) -> str | None:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return next((line.strip() for line in lines if line.strip()), "")


def _mem_total_bytes(meminfo: Path) -> int | None:
    try:
        text = meminfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None

"""Hardware profiles: the shipped files, precedence and provenance, user profiles, board auto-detection."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import PROFILE_SECTIONS, Limits, RateLimit
from agent.config_loader import BUILTIN_SOURCE, describe_effective_config, load_settings, load_settings_with_sources
from agent.errors import ConfigError
from agent.profiles import (
    BUNDLED_PROFILES_DIR,
    Detection,
    available_profiles,
    detect_profile,
    find_profile,
    load_profile,
)

SHIPPED = ["rpi4-1gb", "rpi4-4gb", "rpi5", "jetson-nano", "x86-generic"]
REQUIRED_KEYS = {
    "limits": {
        "workers",
        "num_threads",
        "max_concurrent_inferences",
        "max_payload_bytes",
        "max_input_elements",
        "intake_queue",
        "intake_max_bytes",
        "model_memory_mb",
        "process_memory_mb",
        "process_soft_limit_mb",
    },
    "outbox": {"max_bytes", "max_messages"},
    "inference": {"accelerator"},
}
MEMORY_KEYS = ["model_memory_mb", "process_memory_mb", "process_soft_limit_mb"]
TEGRA_RELEASE = "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: Sat Feb 19 2022\n"
GIB_KB = 1024 * 1024


@pytest.fixture(autouse=True)
def no_agent_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the EDGE_AGENT_ variables it sets itself."""
    for name in list(os.environ):
        if name.upper().startswith("EDGE_AGENT_"):
            monkeypatch.delenv(name)


def shipped_path(name: str) -> Path:
    return BUNDLED_PROFILES_DIR / f"{name}.toml"


def label(name: str) -> str:
    return f"profile {name} ({shipped_path(name)})"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fake_root(
    base: Path,
    *,
    model: str | None = None,
    model_under_sys: bool = False,
    tegra: str | None = None,
    mem_total_kb: int | None = None,
) -> Path:
    """A directory laid out like the parts of / that detection reads."""
    base.mkdir(parents=True, exist_ok=True)
    if model is not None:
        where = "sys/firmware/devicetree/base/model" if model_under_sys else "proc/device-tree/model"
        (base / where).parent.mkdir(parents=True, exist_ok=True)
        (base / where).write_bytes(model.encode() + b"\x00")  # device-tree strings are NUL-terminated
    if tegra is not None:
        write(base / "etc/nv_tegra_release", tegra)
    if mem_total_kb is not None:
        write(base / "proc/meminfo", f"MemTotal:       {mem_total_kb} kB\nMemFree:          123456 kB\n")
    return base


# --- the shipped profiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_validates_and_is_complete(name: str) -> None:
    profile = load_profile(name, PROFILE_SECTIONS)
    assert profile.path == shipped_path(name)
    assert profile.description
    assert {section: set(values) for section, values in profile.values.items()} == REQUIRED_KEYS

    settings, sources, applied = load_settings_with_sources(overrides={"profile": name})
    assert applied == profile
    for section, keys in REQUIRED_KEYS.items():
        for key in keys:
            assert getattr(getattr(settings, section), key) == profile.values[section][key]
            assert sources[f"{section}.{key}"] == label(name)


def test_all_shipped_profiles_are_listed() -> None:
    assert set(SHIPPED) <= set(available_profiles())


def test_the_fallback_profile_is_the_smallest_in_memory() -> None:
    # Auto-detection falls back to rpi4-1gb whenever memory is short or unknown; that is only safe if it
    # asks for less memory than every other profile.
    smallest = load_profile("rpi4-1gb", PROFILE_SECTIONS).values["limits"]
    assert smallest["process_memory_mb"] <= 160
    for name in SHIPPED[1:]:
        other = load_profile(name, PROFILE_SECTIONS).values["limits"]
        for key in MEMORY_KEYS:
            assert smallest[key] < other[key], (name, key)


# --- precedence and provenance ----------------------------------------------------------------------


def test_environment_beats_file_beats_profile_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(
        tmp_path / "config.toml",
        'profile = "rpi4-1gb"\n[limits]\nworkers = 3\nnum_threads = 3\n[rate_limit]\nburst = 7\n',
    )
    monkeypatch.setenv("EDGE_AGENT_LIMITS__NUM_THREADS", "4")
    settings, sources, profile = load_settings_with_sources(config)

    assert profile is not None and profile.name == "rpi4-1gb" and profile.reason is None
    assert (settings.limits.num_threads, sources["limits.num_threads"]) == (
        4,
        "environment EDGE_AGENT_LIMITS__NUM_THREADS",
    )
    assert (settings.limits.workers, sources["limits.workers"]) == (3, str(config))
    assert (settings.rate_limit.burst, sources["rate_limit.burst"]) == (7, str(config))
    assert (settings.limits.model_memory_mb, sources["limits.model_memory_mb"]) == (60, label("rpi4-1gb"))
    assert (settings.limits.max_nesting_depth, sources["limits.max_nesting_depth"]) == (32, BUILTIN_SOURCE)
    assert sources["profile"] == str(config)
    assert sources["local.port"] == BUILTIN_SOURCE


def test_whole_section_from_environment_json_and_nested_variable_on_top(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_PROFILE", "rpi5")
    monkeypatch.setenv("EDGE_AGENT_RATE_LIMIT", '{"burst": 9, "requests_per_s": 3}')
    monkeypatch.setenv("EDGE_AGENT_RATE_LIMIT__BURST", "11")
    settings, sources, _ = load_settings_with_sources()
    assert (settings.rate_limit.requests_per_s, sources["rate_limit.requests_per_s"]) == (
        3.0,
        "environment EDGE_AGENT_RATE_LIMIT",
    )
    assert (settings.rate_limit.burst, sources["rate_limit.burst"]) == (11, "environment EDGE_AGENT_RATE_LIMIT__BURST")
    assert sources["rate_limit.global_requests_per_s"] == BUILTIN_SOURCE  # the shipped profiles set no hard caps
    assert sources["limits.intake_queue"] == label("rpi5")
    assert sources["profile"] == "environment EDGE_AGENT_PROFILE"


def test_profile_named_in_environment_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "config.toml", 'profile = "rpi4-1gb"\n')
    monkeypatch.setenv("EDGE_AGENT_PROFILE", "x86-generic")
    settings, sources, profile = load_settings_with_sources(config)
    assert profile is not None and profile.name == "x86-generic"
    assert settings.limits.model_memory_mb == 1024
    assert sources["profile"] == "environment EDGE_AGENT_PROFILE"


def test_overrides_stand_in_for_the_file_and_lose_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "config.toml", "[limits]\nintake_queue = 5\nworkers = 3\n")
    monkeypatch.setenv("EDGE_AGENT_LIMITS__WORKERS", "6")
    settings, sources, _ = load_settings_with_sources(config, {"limits": {"intake_queue": 9, "workers": 4}})
    assert (settings.limits.intake_queue, sources["limits.intake_queue"]) == (9, "overrides")
    assert (settings.limits.workers, sources["limits.workers"]) == (6, "environment EDGE_AGENT_LIMITS__WORKERS")


def test_default_profile_means_built_in_defaults() -> None:
    settings, sources, profile = load_settings_with_sources()
    assert profile is None
    assert settings.limits == Limits() and settings.rate_limit == RateLimit()
    assert sources["limits.workers"] == BUILTIN_SOURCE
    assert "the built-in defaults without a profile file" in describe_effective_config(load_settings_with_sources())


LAYERED_KEYS = [
    ("limits", "intake_queue"),
    ("limits", "max_payload_bytes"),
    ("limits", "max_nesting_depth"),
    ("rate_limit", "burst"),
    ("rate_limit", "global_requests_per_s"),
]
LAYERS = ["profile", "file", "env"]  # lowest precedence first


@settings(max_examples=40, deadline=None)
@given(
    chosen=st.lists(st.sets(st.sampled_from(LAYERS)), min_size=len(LAYERED_KEYS), max_size=len(LAYERED_KEYS)),
    base=st.integers(min_value=300, max_value=480),
)
def test_each_key_comes_from_its_highest_layer(chosen: list[set[str]], base: int) -> None:
    """Whichever layers set a key, the highest one wins and the provenance names it."""
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.upper().startswith("EDGE_AGENT_"):
                patch.delenv(name)
        tables: dict[str, dict[str, list[str]]] = {layer: {} for layer in LAYERS}
        expected: dict[str, tuple[int, str]] = {}
        profile_path = Path(folder) / "board.toml"
        config_path = Path(folder) / "config.toml"
        for index, ((section, key), layers) in enumerate(zip(LAYERED_KEYS, chosen)):
            for rank, layer in enumerate(LAYERS):
                if layer not in layers:
                    continue
                value = base + 10 * index + rank  # distinct per layer, so the winner is visible
                if layer == "env":
                    patch.setenv(f"EDGE_AGENT_{section.upper()}__{key.upper()}", str(value))
                else:
                    tables[layer].setdefault(section, []).append(f"{key} = {value}")
                source = {
                    "profile": f"profile board ({profile_path})",
                    "file": str(config_path),
                    "env": f"environment EDGE_AGENT_{section.upper()}__{key.upper()}",
                }[layer]
                expected[f"{section}.{key}"] = (value, source)
        write(profile_path, '[profile]\ndescription = "generated"\n' + _tables(tables["profile"]))
        write(config_path, f'profile = "{profile_path}"\n' + _tables(tables["file"]))

        loaded, sources, _ = load_settings_with_sources(config_path)

        for section, key in LAYERED_KEYS:
            actual = getattr(getattr(loaded, section), key)
            want_value, want_source = expected.get(
                f"{section}.{key}", (PROFILE_SECTIONS[section].model_fields[key].default, BUILTIN_SOURCE)
            )
            assert (actual, sources[f"{section}.{key}"]) == (want_value, want_source)


def _tables(sections: dict[str, list[str]]) -> str:
    return "".join(f"[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sections.items())


# --- user profiles and errors ------------------------------------------------------------------------


def test_user_profile_path_relative_to_the_config_file(tmp_path: Path) -> None:
    board = write(
        tmp_path / "etc/boards/my-board.toml",
        '[profile]\ndescription = "a board of my own"\n[limits]\nworkers = 3\nmax_concurrent_inferences = 3\n',
    )
    config = write(tmp_path / "etc/config.toml", 'profile = "boards/my-board.toml"\n')
    settings, sources, profile = load_settings_with_sources(config)
    assert profile is not None and profile.name == "my-board" and profile.path == board
    assert settings.limits.workers == 3
    assert sources["limits.workers"] == f"profile my-board ({board})"
    assert f"profile: my-board ({board}), named by {config}" in describe_effective_config(
        load_settings_with_sources(config)
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[limits]\nworker = 2\n", "unknown key 'limits.worker'"),
        ("[local]\nport = 1884\n", "unknown key 'local' (a profile may set only [inference], [limits], [outbox], [rate_limit])"),
        ('[limits]\nworkers = "many"\n', "limits.workers: Input should be a valid integer"),
        ("[limits]\nnum_threads = 0\n", "limits.num_threads: Input should be greater than or equal to 1"),
        ("[rate_limit]\nrequests_per_s = -1.0\n", "rate_limit.requests_per_s: Input should be greater than 0"),
        ("limits = 3\n", "limits must be a table ([limits]), not int"),
        (
            "[limits]\nprocess_memory_mb = 100\nprocess_soft_limit_mb = 120\nmodel_memory_mb = 50\n",
            "process_soft_limit_mb (120) must be below process_memory_mb (100)",
        ),
        ("[limits]\nworkers = 1\nmax_concurrent_inferences = 2\n", "max_concurrent_inferences (2) cannot exceed"),
        ("[profile]\ndescripton = 'typo'\n", "unknown key 'profile.descripton'"),
        ("[limits\n", "Expected ']'"),
    ],
)
def test_invalid_profile_names_the_key_and_the_profile_file(tmp_path: Path, body: str, expected: str) -> None:
    header = "" if body.startswith("[profile]") else '[profile]\ndescription = "broken"\n'
    # A top-level key must come before the first table, or TOML puts it inside that table.
    board = write(tmp_path / "broken.toml", header + body if body.startswith("[") else body + header)
    config = write(tmp_path / "config.toml", f'profile = "{board}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert f"profile broken ({board})" in message
    assert expected in message
    assert str(config) in message  # who asked for the profile


def test_profile_without_its_description_table_is_refused(tmp_path: Path) -> None:
    board = write(tmp_path / "bare.toml", "[limits]\nworkers = 2\n")
    with pytest.raises(ConfigError, match=r"missing table \[profile\]"):
        load_profile(str(board), PROFILE_SECTIONS)


def test_unknown_profile_name_lists_the_known_ones(tmp_path: Path) -> None:
    config = write(tmp_path / "config.toml", 'profile = "rpi3"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert f"{config} sets profile = 'rpi3'" in message
    assert "unknown profile 'rpi3'" in message
    assert all(name in message for name in ["auto", "default", *SHIPPED])


def test_missing_user_profile_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"profile file .*nowhere\.toml does not exist"):
        load_settings(overrides={"profile": str(tmp_path / "nowhere.toml")})


def test_profile_must_be_a_string(tmp_path: Path) -> None:
    config = write(tmp_path / "config.toml", "profile = 4\n")
    with pytest.raises(ConfigError, match=f"{config}: profile: must be a string"):
        load_settings(config)


def test_file_value_clashing_with_profile_names_both_sources(tmp_path: Path) -> None:
    config = write(tmp_path / "config.toml", 'profile = "rpi4-1gb"\n[limits]\nprocess_memory_mb = 100\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert f"{config}, {label('rpi4-1gb')}: limits:" in message
    assert "process_soft_limit_mb (140) must be below process_memory_mb (100)" in message


def test_unset_budgets_follow_the_ones_that_are_set() -> None:
    # Lowering the process ceiling or the workers alone must not trip over defaults sized for 512 MB.
    settings = load_settings(overrides={"limits": {"process_memory_mb": 300, "workers": 1}})
    assert settings.limits.process_soft_limit_mb == 262
    assert settings.limits.model_memory_mb == 150
    assert settings.limits.max_concurrent_inferences == 1
    assert Limits().process_soft_limit_mb == 448 and Limits().model_memory_mb == 256


def test_workers_below_the_profiles_concurrency_names_both(tmp_path: Path) -> None:
    config = write(tmp_path / "config.toml", 'profile = "rpi4-4gb"\n[limits]\nworkers = 1\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert f"{config}, {label('rpi4-4gb')}: limits:" in str(caught.value)
    assert "max_concurrent_inferences (2) cannot exceed workers (1)" in str(caught.value)


def test_config_file_and_environment_errors_keep_naming_their_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "config.toml", 'profile = "rpi5"\n[limits]\nbogus = 1\n')
    with pytest.raises(ConfigError, match=f"{config}: unknown key 'limits.bogus'"):
        load_settings(config)
    monkeypatch.setenv("EDGE_AGENT_RATE_LIMIT__BURST", "lots")
    with pytest.raises(
        ConfigError, match="environment EDGE_AGENT_RATE_LIMIT__BURST: rate_limit.burst: Input should be"
    ):
        load_settings()
    monkeypatch.setenv("EDGE_AGENT_RATE_LIMIT", "{not json")
    with pytest.raises(ConfigError, match='environment: error parsing value for field "rate_limit"'):
        load_settings()


def test_named_profiles_are_searched_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "repo", tmp_path / "usr-share"
    write(second / "lab.toml", '[profile]\ndescription = "installed"\n')
    assert find_profile("lab", search_dirs=(first, second)) == second / "lab.toml"
    write(first / "lab.toml", '[profile]\ndescription = "from the repo"\n')
    assert load_profile("lab", PROFILE_SECTIONS, search_dirs=(first, second)).description == "from the repo"
    assert available_profiles((first, second)) == ["lab"]


# --- auto-detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("board", "expected", "phrases"),
    [
        (
            {"model": "Raspberry Pi 4 Model B Rev 1.4", "mem_total_kb": 948_304},
            "rpi4-1gb",
            ["Raspberry Pi 4 Model B Rev 1.4", "0.9 GiB", "below 3 GiB", "rather than rpi4-4gb"],
        ),
        (
            {"model": "Raspberry Pi 4 Model B Rev 1.5", "mem_total_kb": 3_884_136},
            "rpi4-4gb",
            ["Raspberry Pi 4 Model B Rev 1.5", "3.7 GiB", "chose rpi4-4gb"],
        ),
        (
            {"model": "Raspberry Pi 5 Model B Rev 1.0", "mem_total_kb": 8_245_260},
            "rpi5",
            ["Raspberry Pi 5 Model B Rev 1.0", "7.9 GiB", "chose rpi5"],
        ),
        (
            {"model": "Raspberry Pi 5 Model B Rev 1.0", "mem_total_kb": 2_006_600},
            "rpi4-1gb",
            ["Raspberry Pi 5", "1.9 GiB", "rather than rpi5"],
        ),
        (
            {"model": "NVIDIA Jetson Nano Developer Kit", "tegra": TEGRA_RELEASE, "mem_total_kb": 4_059_712},
            "jetson-nano",
            ["NVIDIA Jetson", "nv_tegra_release", "R32 (release), REVISION: 7.1", "3.9 GiB", "chose jetson-nano"],
        ),
        (
            {"tegra": TEGRA_RELEASE, "mem_total_kb": 4_059_712},
            "jetson-nano",
            ["NVIDIA Jetson", "nv_tegra_release"],
        ),
        (
            {"mem_total_kb": 16 * GIB_KB},
            "x86-generic",
            ["without a device tree", "16.0 GiB", "chose x86-generic"],
        ),
        (
            {"mem_total_kb": 2 * GIB_KB},
            "rpi4-1gb",
            ["without a device tree", "2.0 GiB", "rather than x86-generic"],
        ),
        (
            {"model": "Raspberry Pi Compute Module 4 Rev 1.0", "model_under_sys": True, "mem_total_kb": 7_999_000},
            "rpi4-4gb",
            ["Compute Module 4", "sys/firmware/devicetree/base/model"],
        ),
        (
            {"model": "Pine64 RockPro64 v2.1", "mem_total_kb": 3_900_000},
            "rpi4-4gb",
            ["no profile of its own", "Pine64 RockPro64"],
        ),
        (
            {"model": "Raspberry Pi 4 Model B Rev 1.4"},
            "rpi4-1gb",
            ["no MemTotal", "smallest profile"],
        ),
    ],
)
def test_auto_detection_from_fake_roots(tmp_path: Path, board: dict, expected: str, phrases: list[str]) -> None:
    root = fake_root(tmp_path / "root", **board)
    detection = detect_profile(root)
    assert detection.name == expected
    for phrase in phrases:
        assert phrase in detection.reason, (phrase, detection.reason)
    assert load_profile(detection.name, PROFILE_SECTIONS).name == expected


def test_auto_profile_through_load_settings_says_what_it_chose_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = fake_root(tmp_path / "root", model="Raspberry Pi 4 Model B Rev 1.4", mem_total_kb=948_304)
    config = write(tmp_path / "config.toml", 'profile = "auto"\n')
    effective = load_settings_with_sources(config, system_root=root)
    settings, sources, profile = effective
    assert settings.profile == "auto"
    assert profile is not None and profile.name == "rpi4-1gb"
    assert profile.reason == detect_profile(root).reason
    assert settings.limits.process_memory_mb == 160
    assert sources["limits.process_memory_mb"] == label("rpi4-1gb")
    text = describe_effective_config(effective)
    assert f"profile: rpi4-1gb ({shipped_path('rpi4-1gb')}), detected because {config} asks for 'auto'" in text
    assert profile.reason in text


def test_detection_result_is_a_name_and_a_sentence(tmp_path: Path) -> None:
    detection = detect_profile(fake_root(tmp_path, mem_total_kb=8 * GIB_KB))
    assert detection == Detection("x86-generic", detection.reason)
    assert detection.reason.endswith(".")


# --- check-config output -----------------------------------------------------------------------------


def test_effective_config_table_redacts_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(
        tmp_path / "config.toml",
        '[local]\nusername = "agent"\npassword = "hunter2"\n'
        '[cloud]\nhost = "127.0.0.1"\npassword = "cloud-secret"\n'
        '[signing]\nowner_auth = "tpm-owner"\n',
    )
    monkeypatch.setenv("EDGE_AGENT_LIMITS__WORKERS", "3")
    text = describe_effective_config(load_settings_with_sources(config))
    for secret in ("hunter2", "cloud-secret", "tpm-owner"):
        assert secret not in text
    rows = {line.split()[0]: line for line in text.splitlines() if line and not line.startswith(("profile", " "))}
    assert "<redacted>" in rows["local.password"] and str(config) in rows["local.password"]
    assert "<redacted>" in rows["signing.owner_auth"]
    assert '"agent"' in rows["local.username"]
    assert rows["limits.workers"].split()[1:] == ["3", "environment", "EDGE_AGENT_LIMITS__WORKERS"]
    assert rows["limits.num_threads"].split()[1:] == ["1", "built-in", "default"]

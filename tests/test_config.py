"""Config files and environment overrides, through the real command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import CloudBroker
from agent.config_loader import load_settings
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _check_config(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--config", str(path)],
        cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )


def test_unknown_key_is_an_error_naming_the_key_and_the_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "pi-1"\n[local]\nport = 1884\nprot = 1\n')
    done = _check_config(config)
    assert done.returncode != 0
    assert "local.prot" in done.stderr and str(config) in done.stderr


def test_valid_file_passes_and_environment_overrides_nested_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "pi-1"\n[local]\nport = 1884\n[limits]\nworkers = 1\n')
    assert _check_config(config).returncode == 0
    monkeypatch.setenv("EDGE_AGENT_LOCAL__PORT", "1999")
    settings = load_settings(config)
    assert (settings.device_id, settings.local.port, settings.limits.workers) == ("pi-1", 1999, 1)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('device_id = "a/b"\n', "device id"),
        ("[limits]\nworkers = 0\n", "limits.workers"),
        ('[cloud]\nhost = "cloud.example.com"\ntls = false\n', "TLS is required"),
        ("device_id = \n", "agent.toml"),
    ],
)
def test_invalid_values_are_refused_clearly(tmp_path: Path, body: str, needle: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(body)
    with pytest.raises(ConfigError, match=needle):
        load_settings(config)


def test_a_device_signs_with_its_tpm_by_default() -> None:
    assert load_settings(None).signing.backend == "tpm"


def test_drain_rounds_follow_batching_unless_set() -> None:
    # Batched records wait for their batch: the drain claims them less often, never longer than they wait.
    assert CloudBroker(host="127.0.0.1").drain_linger_ms == 100
    assert CloudBroker(host="127.0.0.1", batch_linger_ms=40).drain_linger_ms == 40
    assert CloudBroker(host="127.0.0.1", batch_linger_ms=0).drain_linger_ms == 10
    assert CloudBroker(host="127.0.0.1", batch=False).drain_linger_ms == 10
    assert CloudBroker(host="127.0.0.1", drain_linger_ms=5).drain_linger_ms == 5

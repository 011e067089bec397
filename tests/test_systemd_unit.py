"""systemd/edge-agent.service passes `systemd-analyze verify`, scores "OK" or better in `systemd-analyze
security`, keeps the TPM reachable, and accepts the memory drop-in that provision-device writes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import Limits
from agent.config_loader import load_settings
from provisioning.device import DeviceLayout, provision

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "edge-agent.service"
INSTALLED_COMMAND = "/opt/edge-agent/venv/bin/edge-agent"
# The command line installed on a device; `verify` insists that it exists, so tests use this venv's.
LOCAL_COMMAND = Path(sys.executable).parent / "edge-agent"
GOOD_ENOUGH = {"PERFECT", "SAFE", "OK"}
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def _stage_unit(directory: Path, dropins: dict[str, str] | None = None) -> Path:
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED_COMMAND} ") == 1
    unit = directory / "edge-agent.service"
    unit.write_text(text.replace(f"ExecStart={INSTALLED_COMMAND} ", f"ExecStart={LOCAL_COMMAND} "))
    for name, content in (dropins or {}).items():
        (directory / "edge-agent.service.d").mkdir(exist_ok=True)
        (directory / "edge-agent.service.d" / name).write_text(content)
    return unit


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60)


def test_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    done = _analyze("verify", "--man=no", str(_stage_unit(tmp_path)))
    # verify exits 0 even for unknown keys and unparsable values; it only warns about them.
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_unit_exposure_is_ok_or_better(tmp_path: Path) -> None:
    done = _analyze("security", "--offline=true", str(_stage_unit(tmp_path)))
    match = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d+) ([A-Z]+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert match.group(2) in GOOD_ENOUGH, f"exposure {match.group(1)} {match.group(2)}"


def test_sandbox_hides_every_device_but_the_tpm(tmp_path: Path) -> None:
    done = _analyze("security", "--offline=true", "--json=short", str(_stage_unit(tmp_path)))
    checks = {item["name"]: item for item in json.loads(done.stdout)}
    # PrivateDevices= would hide /dev/tpmrm0; the device ACL lets only it through (ProtectClock= adds rtc:r).
    assert not checks["PrivateDevices="]["set"]
    allowed = checks["DeviceAllow="]["description"].split(": ", 1)[1].split()
    assert sorted(allowed) == ["/dev/tpmrm0:rw", "char-rtc:r"]
    for name in (
        "ProtectSystem=",
        "ProtectHome=",
        "NoNewPrivileges=",
        "PrivateTmp=",
        "MemoryDenyWriteExecute=",
        "SystemCallFilter=~@privileged",
        "RestrictAddressFamilies=~AF_PACKET",
        "User=/DynamicUser=",
    ):
        assert checks[name]["set"], name


def test_descriptor_limit_is_explicit_and_above_the_default() -> None:
    # Issue #12: under the 1,024 default, idle /metrics connections took every descriptor and the agent could
    # not reconnect to its broker. The cap on connections is the fix (tests/test_hostile_peers.py runs it
    # under 256); the unit's explicit limit is headroom on top.
    limits = re.findall(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.MULTILINE)
    assert len(limits) == 1 and int(limits[0]) > 1024, limits


def test_memory_dropin_from_provisioning_verifies(tmp_path: Path) -> None:
    layout = DeviceLayout(tmp_path / "root")
    provision(
        layout,
        device_id="dev1",
        profile="rpi4-1gb",
        signing_backend="software",
        broker_names=[],
        edge_agent=LOCAL_COMMAND,
    )
    dropin = layout.memory_dropin.read_text()
    ceiling = load_settings(layout.config).limits.process_memory_mb
    assert ceiling != Limits().process_memory_mb  # the profile's, not the built-in default
    assert f"\nMemoryMax={ceiling}M\n" in dropin, dropin
    done = _analyze("verify", "--man=no", str(_stage_unit(tmp_path, {"memory.conf": dropin})))
    assert done.returncode == 0 and done.stderr == "", done.stderr

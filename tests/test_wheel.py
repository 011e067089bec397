"""The wheel is self-contained: built, installed in a fresh venv and run outside the checkout, a device with
``profile = "rpi4-1gb"`` and no ``models_dir`` serves the bundled models."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from agent.mqtt.localbroker import MosquittoProcess
from tests.fixtures.agents import REPO_ROOT, AgentProcess, write_config

PROFILES = sorted(path.name for path in (REPO_ROOT / "firmware_profiles").glob("*.toml"))
BUNDLED_MODELS = ["manifest.json", "sensor_state.tflite", "vibration_anomaly.tflite"]


def _build_wheel(target: Path) -> Path:
    target.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(target), str(REPO_ROOT)],
                   check=True, capture_output=True, cwd=target)
    [wheel] = target.glob("edge_agent-*.whl")
    return wheel


def _fresh_venv(root: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed; its dependencies are this interpreter's (a .pth, no download)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    return root


def test_the_wheel_carries_profiles_and_bundled_models_and_no_generators(tmp_path: Path) -> None:
    names = zipfile.ZipFile(_build_wheel(tmp_path)).namelist()
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("agent/firmware_profiles/")) == PROFILES
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("agent/bundled_models/")) == BUNDLED_MODELS
    assert not [n for n in names if not n.startswith(("agent/", "edge_agent-"))], "only the agent package and its metadata"
    assert "agent/models/metadata_schema.py" in names  # the generated TFLite Metadata reader is vendored code


def test_an_installed_agent_serves_the_bundled_models_with_a_named_profile(
    tmp_path: Path, local_broker: MosquittoProcess, client_factory, monkeypatch
) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)  # nothing may come from the checkout
    venv = _fresh_venv(tmp_path / "venv", _build_wheel(tmp_path / "dist"))
    elsewhere = tmp_path / "device"
    elsewhere.mkdir()
    config = write_config(elsewhere / "agent.toml", {
        "device_id": "dev1",
        "profile": "rpi4-1gb",
        "data_dir": str(elsewhere / "data"),
        "local": {"host": local_broker.host, "port": local_broker.port},
        "signing": {"backend": "none"},
        "metrics": {"port": 0},
    })
    located = subprocess.run([venv / "bin" / "python", "-c", "import agent; print(agent.__file__)"],
                             capture_output=True, text=True, cwd=elsewhere)
    assert located.returncode == 0, located.stderr
    located = located.stdout
    assert located.startswith(str(venv)), located
    agent = AgentProcess(config, local_broker, command=[str(venv / "bin" / "edge-agent")], cwd=elsewhere).start()
    try:
        manifest = json.loads((REPO_ROOT / "models" / "manifest.json").read_text())
        entry = next(model for model in manifest["models"] if model["id"] == "vibration-anomaly")
        example = entry["examples"][0]
        reply = client_factory("wheel").call("infer", {"model": "vibration-anomaly", "inputs": example["inputs"]})
        assert reply["result"]["model"] == "vibration-anomaly", reply
        assert reply["result"]["top"][0]["label"] == example["expect"], reply
    finally:
        agent.stop()

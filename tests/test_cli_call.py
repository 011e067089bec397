"""``edge-agent call`` end to end: a real subprocess asks a real in-process agent over a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import ENV_PREFIX
from agent.mqtt.localbroker import MosquittoProcess
from tests.fixtures.agents import REPO_ROOT


def vibration_example(models_dir: Path, index: int) -> dict[str, Any]:
    manifest = json.loads((models_dir / "manifest.json").read_text())
    entry = next(model for model in manifest["models"] if model["id"] == "vibration-anomaly")
    return entry["examples"][index]


@pytest.fixture
def call_cli(start_agent: Callable[..., Any], local_broker: MosquittoProcess) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m agent call --device dev1 --host H --port P ARGS...`` against a running agent."""
    start_agent()
    # The command must work from its arguments alone, whatever EDGE_AGENT_ variables this shell has.
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}

    def call(*args: str, device: str = "dev1", stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "agent", "call", "--device", device,
                   "--host", local_broker.host, "--port", str(local_broker.port), *args]
        return subprocess.run(command, cwd=REPO_ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=60)

    return call


def test_prints_the_top_label_readably(call_cli: Callable[..., subprocess.CompletedProcess[str]], models_dir: Path) -> None:
    example = vibration_example(models_dir, 1)
    done = call_cli("vibration-anomaly", f"features={json.dumps(example['inputs']['features'])}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("model vibration-anomaly 1.0.0")
    # The first ranked line is the expected label with its score.
    assert lines[1].split()[0] == example["expect"]
    assert float(lines[1].split()[1]) > 0.5
    assert any(line.strip().startswith("timing:") for line in lines)


def test_json_out_prints_the_reply_as_json(call_cli: Callable[..., subprocess.CompletedProcess[str]], models_dir: Path) -> None:
    example = vibration_example(models_dir, 0)
    done = call_cli("--json-out", "vibration-anomaly", f"features={json.dumps(example['inputs']['features'])}")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["jsonrpc"] == "2.0"
    assert reply["result"]["top"][0]["label"] == example["expect"]
    assert reply["result"]["served_by"] == "local"


def test_request_from_a_json_file_and_from_stdin(
    call_cli: Callable[..., subprocess.CompletedProcess[str]], models_dir: Path, tmp_path: Path
) -> None:
    example = vibration_example(models_dir, 2)
    request = {"method": "infer", "params": {"model": "vibration-anomaly", "inputs": example["inputs"], "top_k": 1}}
    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps(request))

    from_file = call_cli("--json", str(request_file), "--json-out")
    assert from_file.returncode == 0, from_file.stderr
    assert [item["label"] for item in json.loads(from_file.stdout)["result"]["top"]] == [example["expect"]]

    listed = call_cli("--json", "-", "--json-out", stdin=json.dumps({"method": "models/list"}))
    assert listed.returncode == 0, listed.stderr
    assert {"vibration-anomaly", "sensor-state", "face-detector"} <= {m["id"] for m in json.loads(listed.stdout)["result"]["models"]}


def test_unknown_model_exits_non_zero_with_the_error(call_cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    done = call_cli("no-such-model", "x=[[1.0]]")
    assert done.returncode != 0
    assert "-32602" in done.stdout
    assert "no-such-model" in done.stdout


def test_device_that_never_answers_exits_non_zero(call_cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    done = call_cli("--timeout", "0.5", "vibration-anomaly", "features=[[0,0,0,0,0,0,0,0]]", device="absent-device")
    assert done.returncode == 1
    assert "absent-device" in done.stderr
    assert "Traceback" not in done.stderr

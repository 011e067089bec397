"""``make demo``: a private broker, a real agent process with the bundled models, a few real requests.

Everything it starts (mosquitto, swtpm when installed, the agent) is stopped again before it returns.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.config import BUNDLED_MODELS_DIR, LocalBroker
from agent.errors import AgentError
from agent.models.catalog import load_manifest
from agent.mqtt import topics
from agent.mqtt.localbroker import MosquittoProcess
from agent.signing.swtpm import SwtpmProcess
from agent.tools.client import DeviceClient

DEVICE_ID = "demo-device"


def _signing_env(workdir: Path, stack: list[Any]) -> dict[str, str]:
    """swtpm-backed delegated signing when swtpm is installed, else a software key (which warns loudly)."""
    if shutil.which("swtpm"):
        tpm = SwtpmProcess(workdir / "swtpm").start()
        stack.append(tpm)
        return {"EDGE_AGENT_SIGNING__BACKEND": "tpm", "EDGE_AGENT_SIGNING__TCTI": tpm.tcti}
    return {"EDGE_AGENT_SIGNING__BACKEND": "software", "EDGE_AGENT_SIGNING__KEY_FILE": str(workdir / "device-key.pem")}


def _start_agent(broker: MosquittoProcess, workdir: Path, env_extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "EDGE_AGENT_DEVICE_ID": DEVICE_ID,
        "EDGE_AGENT_LOCAL__HOST": broker.host,
        "EDGE_AGENT_LOCAL__PORT": str(broker.port),
        "EDGE_AGENT_DATA_DIR": str(workdir / "data"),
        "EDGE_AGENT_MODELS_DIR": str(BUNDLED_MODELS_DIR),
        **env_extra,
    }
    log = open(workdir / "agent.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run"], env=env, stdout=log, stderr=log)
    log.close()
    return proc


def _wait_online(client: DeviceClient, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 30.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise AgentError(f"the agent exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            client.call("ping", timeout=1)
            return time.monotonic() - started
        except AgentError:
            continue
    raise AgentError(f"the agent did not answer within {timeout:.0f} s:\n{log_path.read_text()[-2000:]}")


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths))


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    print(_row(header, widths))
    print(_row(["-" * width for width in widths], widths))
    for row in rows:
        print(_row(row, widths))


def _run_requests(client: DeviceClient) -> int:
    manifest = load_manifest(BUNDLED_MODELS_DIR)
    rows: list[list[str]] = []
    failures = 0
    for entry in manifest.models:
        for example in entry.examples:
            reply = client.call("infer", {"model": entry.id, "inputs": example.inputs})
            if "error" in reply:
                failures += 1
                rows.append([entry.id, example.title, example.expect or "", f"error {reply['error']['message']}", "", ""])
                continue
            result = reply["result"]
            best = result["top"][0]
            ok = best["label"] == example.expect
            failures += not ok
            rows.append([
                entry.id,
                example.title,
                example.expect or "",
                f"{best['label']} ({best['score']:.2f}){'' if ok else '  <-- unexpected'}",
                f"{result['timing_ms']['inference']:.2f}",
                f"{result['timing_ms']['total']:.2f}",
            ])
    print(f"\nInference requests on mcp/req/{DEVICE_ID}/{client.client_id}:\n")
    _print_table(["model", "example", "expected", "answer", "infer ms", "total ms"], rows)

    print("\nOther methods:\n")
    others = [
        ("models/list", None),
        ("tools/list", None),
        ("ping", None),
        ("infer", {"model": "no-such-model", "inputs": {}}),
        ("infer", {"model": "vibration-anomaly", "inputs": {"features": [[1, 2, 3]]}}),
        ("reboot", None),
    ]
    method_rows = []
    for method, params in others:
        reply = client.call(method, params)
        if "error" in reply:
            outcome = f"error {reply['error']['code']}: {reply['error']['message']}"
        elif method == "models/list":
            outcome = ", ".join(f"{m['id']} {m['version']} ({m['task']})" for m in reply["result"]["models"])
        elif method == "tools/list":
            outcome = f"{len(reply['result']['tools'])} MCP tools: " + ", ".join(t["name"] for t in reply["result"]["tools"])
        else:
            outcome = json.dumps({key: value for key, value in reply["result"].items() if key != "_meta"})
        signed = "yes" if "sig" in json.dumps(reply) else "no"
        method_rows.append([method, json.dumps(params)[:50] if params else "", outcome[:110], signed])
    _print_table(["method", "params", "outcome", "signed"], method_rows)
    return failures


def run_demo() -> int:
    """Start broker (+swtpm), agent; send the manifest's examples and a few other requests; stop all."""
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    stack: list[Any] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        broker = MosquittoProcess(workdir / "broker").start()
        stack.append(broker)
        print(f"mosquitto: private broker on {broker.host}:{broker.port}")
        signing = _signing_env(workdir, stack)
        print(f"signing:   {signing['EDGE_AGENT_SIGNING__BACKEND']}")
        proc = _start_agent(broker, workdir, signing)
        with DeviceClient(LocalBroker(host=broker.host, port=broker.port), DEVICE_ID, "demo-client") as client:
            ready = _wait_online(client, proc, workdir / "agent.log")
            print(f"agent:     device {DEVICE_ID!r} answering after {ready:.2f} s (log: {workdir / 'agent.log'})")
            print(f"status:    retained on {topics.status_topic(DEVICE_ID)}")
            failures = _run_requests(client)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        print(f"\nagent stopped cleanly (exit {code}); {'all answers as expected' if not failures else f'{failures} unexpected'}")
        return 0 if failures == 0 and code == 0 else 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for part in reversed(stack):
            part.close()

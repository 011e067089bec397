"""The processes a benchmark run owns: the agent under test, the reference responders and the load generators.

Everything runs as a separate process over a private mosquitto on loopback, so the agent, the responders
and the clients compete for the CPU the way they would on a device, and no measurement shares a GIL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import ENV_PREFIX
from agent.errors import AgentError
from agent.mqtt import topics
from agent.mqtt.localbroker import MosquittoProcess, terminate
from agent.mqtt.transport import new_client
from benchmarks.placement import Placement

REPO_ROOT = Path(__file__).resolve().parent.parent


def _clean_environment(overrides: dict[str, str]) -> dict[str, str]:
    """This process's environment without any EDGE_AGENT_ setting of its own, plus ``overrides``."""
    env = {name: value for name, value in os.environ.items() if not name.upper().startswith(ENV_PREFIX)}
    return {**env, "PYTHONUNBUFFERED": "1", **overrides}


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> int:
    """Voluntary plus involuntary context switches of all a process's threads so far (its thread hand-offs)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            lines = status.read_text().splitlines()
        except FileNotFoundError:  # the thread ended while being read
            continue
        fields = (line.partition(":") for line in lines)
        total += sum(int(value) for name, _, value in fields if name.endswith("ctxt_switches"))
    return total


class TopicWatcher:
    """A subscriber counting messages on some filters; can wait for the first live ``online`` status."""

    def __init__(self, broker: MosquittoProcess, *filters: str) -> None:
        self.count = 0
        self.online_at: float | None = None
        self._online = threading.Event()
        subscribed = threading.Event()
        self._client = new_client(f"watcher-{time.monotonic_ns()}")
        self._client.on_connect = lambda c, u, f, r, p: c.subscribe([(flt, 1) for flt in filters])
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        if not subscribed.wait(10):
            raise AgentError("watcher could not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.count += 1
        # A retained copy describes an earlier run; the live (non-retained) "online" is the new process's.
        if message.retain or not message.topic.startswith(f"{topics.STATUS_PREFIX}/"):
            return
        try:
            status = json.loads(message.payload).get("status")
        except (ValueError, AttributeError):
            return
        if status == "online" and not self._online.is_set():
            self.online_at = time.perf_counter()
            self._online.set()

    def wait_online(self, timeout: float) -> bool:
        return self._online.wait(timeout)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class AgentUnderTest:
    """``python -m agent run`` as a subprocess, configured only through ``EDGE_AGENT_`` environment variables."""

    def __init__(
        self, broker: MosquittoProcess, device_id: str, settings: dict[str, str], log_path: Path,
        placement: Placement | None = None, tree: Path = REPO_ROOT,
    ) -> None:
        self.broker = broker
        self.placement = placement
        self.device_id = device_id
        # ``tree``: the checkout whose agent runs (another commit's worktree, for side-by-side comparisons).
        self.tree = tree
        tree_path = {} if tree == REPO_ROOT else {"PYTHONPATH": str(tree)}
        self.env = _clean_environment(
            {
                **tree_path,
                f"{ENV_PREFIX}DEVICE_ID": device_id,
                f"{ENV_PREFIX}LOCAL__HOST": broker.host,
                f"{ENV_PREFIX}LOCAL__PORT": str(broker.port),
                **{f"{ENV_PREFIX}{name.upper()}": value for name, value in settings.items()},
            }
        )
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    def start(self, timeout: float = 30.0) -> float:
        """Start the process; returns seconds from spawning it to its first live ``online`` status."""
        watcher = TopicWatcher(self.broker, topics.status_topic(self.device_id))
        try:
            with open(self.log_path, "ab") as log:
                spawned = time.perf_counter()
                command = [sys.executable, "-m", "agent", "run"]
                if self.placement is not None:
                    command = self.placement.command(command)
                self.proc = subprocess.Popen(command, stdout=log, stderr=log, cwd=self.tree, env=self.env)
            deadline = spawned + timeout
            while not watcher.wait_online(0.05):
                if self.proc.poll() is not None or time.perf_counter() > deadline:
                    self.stop()
                    log_tail = self.log_path.read_text()[-2000:]
                    raise AgentError(f"agent did not come online; end of {self.log_path}:\n{log_tail}")
            assert watcher.online_at is not None
            self.startup_s = watcher.online_at - spawned
        finally:
            watcher.close()
        return self.startup_s

    def effective_config(self) -> dict[str, Any]:
        """The configuration this agent runs with: its environment loaded by the agent's own config loader."""
        program = "from agent.config_loader import load_settings; print(load_settings().model_dump_json())"
        done = subprocess.run(
            [sys.executable, "-c", program], cwd=REPO_ROOT, env=self.env, capture_output=True, check=True
        )
        return json.loads(done.stdout)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the agent is not running"
        return self.proc.pid

    def memory_mb(self) -> dict[str, float]:
        """Peak (VmHWM) and current (VmRSS) resident memory of the agent process, in MB."""
        assert self.proc is not None
        values: dict[str, float] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                values[name] = round(int(rest.split()[0]) / 1024, 1)
        return values

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None


class Responder:
    """A reference responder (``benchmarks.responders``) as a subprocess, started once it has subscribed."""

    def __init__(
        self, broker: MosquittoProcess, kind: str, device_id: str, *extra: str, placement: Placement | None = None
    ) -> None:
        command = [
            sys.executable, "-m", "benchmarks.responders", kind, "--host", broker.host, "--port", str(broker.port),
            "--device", device_id, *extra,
        ]
        if placement is not None:
            command = placement.command(command)
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=_clean_environment({}), stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise AgentError(f"{kind} responder did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        terminate(self.proc)

    def __enter__(self) -> "Responder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_load(
    broker: MosquittoProcess, device_id: str, payload: Path, *, inflight: int, duration: float,
    warmup: float = 1.0, rate: float | None = None, abandon_after: float | None = None,
) -> subprocess.Popen[bytes]:
    """Spawn one load generator process (``benchmarks.load``); collect it with :func:`load_result`."""
    command = [
        sys.executable, "-m", "benchmarks.load", "--host", broker.host, "--port", str(broker.port),
        "--device", device_id, "--payload", str(payload), "--inflight", str(inflight),
        "--duration", str(duration), "--warmup", str(warmup),
    ]
    if rate is not None:
        command += ["--rate", str(rate)]
    if abandon_after is not None:
        command += ["--abandon-after", str(abandon_after)]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=_clean_environment({}), stdout=subprocess.PIPE)


def load_result(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:  # interrupted or timed out: the generator must not outlive the run
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise AgentError(f"load generator failed with exit code {proc.returncode}")
    return json.loads(out)


def run_load(broker: MosquittoProcess, device_id: str, payload: Path, **options: Any) -> dict[str, Any]:
    """Run one load generator to completion and return its statistics."""
    return load_result(start_load(broker, device_id, payload, **options))


def raw_invoke_rate(
    model: Path, *, threads: int, num_threads: int, duration: float, placement: Placement | None = None,
    picture_b64: Path | None = None, manifest_entry: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The raw invoke rate of ``model`` (``benchmarks.rawinvoke``) in its own process, on the responder's
    CPUs when pinned (it is the reference for the agent's face path); with ``picture_b64`` and
    ``manifest_entry``, the rate of whole picture requests without serving (the JPEG path's ceiling)."""
    command = [
        sys.executable, "-m", "benchmarks.rawinvoke", "--model", str(model), "--threads", str(threads),
        "--num-threads", str(num_threads), "--duration", str(duration),
    ]
    if picture_b64 is not None and manifest_entry is not None:
        command += ["--picture-b64", str(picture_b64), "--manifest-entry", json.dumps(manifest_entry)]
    if placement is not None:
        command = placement.command(command)
    done = subprocess.run(command, cwd=REPO_ROOT, env=_clean_environment({}), capture_output=True, check=True)
    return json.loads(done.stdout)

"""A private mosquitto process on a free loopback port, for the demo, tests and benchmarks.

The machine may already run a mosquitto on 1883; this never touches it. The broker runs in the
foreground under Popen so that stopping it (gracefully or with SIGKILL) is under the caller's control.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.errors import AgentError


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until ``host:port`` accepts TCP connections, or raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise AgentError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def terminate(proc: subprocess.Popen[Any] | None, timeout: float = 20.0) -> None:
    """SIGTERM a child process still running and wait for it; SIGKILL it after ``timeout`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class MosquittoProcess:
    """A mosquitto broker owned by this process: ``start()``, ``stop()``, ``kill()``, ``restart()``.

    The port stays the same across restarts so clients can reconnect, and persistence can be switched on
    so that a restart keeps sessions and queued QoS 1 messages like a production broker does.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        port: int | None = None,
        persistence: bool = True,
        extra_config: str = "",
        listener_config: str | None = None,
        queue_config: str | None = None,
        binary: str | None = None,
    ) -> None:
        """``listener_config`` replaces the default anonymous plaintext listener (with a TLS listener and ACLs,
        say) and must open ``self.port``, which ``start()`` waits for; ``queue_config`` replaces the default
        queue bounds (generous, so that tests see the agent's own bounds; the shipped device broker's are
        in systemd/mosquitto-edge-agent.conf); ``extra_config`` is appended at the end."""
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._owned_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edge-agent-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.persistence = persistence
        self.extra_config = extra_config
        self.listener_config = listener_config
        self.queue_config = queue_config or "max_queued_messages 100000\nmax_inflight_messages 0"
        self.binary = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.log_path = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def _write_config(self) -> None:
        # Under root mosquitto drops to its own user, which cannot reach a private 0700 temporary directory
        # to save its persistence file; this broker is a private one, so it keeps the caller's identity.
        lines = ["user root"] if os.geteuid() == 0 else []
        lines.append(self.listener_config or f"listener {self.port} {self.host}\nallow_anonymous true")
        lines += [
            # Without it every QoS 1 round trip on loopback stalls ~40 ms on delayed ACKs.
            "set_tcp_nodelay true",
            self.queue_config,
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra_config)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (benchmarks read its CPU time)."""
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, timeout: float = 10.0) -> "MosquittoProcess":
        """Start the broker and wait until it accepts connections."""
        if self.running:
            return self
        self._write_config()
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        try:
            wait_for_port(self.host, self.port, timeout)
        except AgentError:
            self.kill()
            raise AgentError(f"mosquitto did not start; see {self.log_path}") from None
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker gracefully (SIGTERM), saving its persistence file."""
        terminate(self._proc, timeout)
        self._proc = None

    def kill(self) -> None:
        """Kill the broker with SIGKILL, as a crash or power cut would."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and remove its working directory if this object created it."""
        self.stop()
        if self._owned_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "MosquittoProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

"""A private swtpm (software TPM 2.0) on two adjacent loopback ports, for the demo, tests and benchmarks.

swtpm runs in the foreground under Popen so the caller owns its lifetime (stop, kill -9, restart).
The swtpm TCTI expects the control channel on the server port + 1, hence the adjacent pair.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from agent.errors import SigningError

HOST = "127.0.0.1"


def free_port_pair(host: str = HOST, attempts: int = 50) -> int:
    """Return a port ``p`` such that ``p`` and ``p + 1`` are both free on ``host`` right now."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind((host, 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind((host, port + 1))
                except OSError:
                    continue
            return port
    raise SigningError(f"found no two adjacent free ports on {host} after {attempts} attempts")


class SwtpmProcess:
    """One swtpm process with its own state directory; ``restart()`` keeps the ports and the TPM state."""

    def __init__(self, state_dir: Path | None = None, *, binary: str | None = None) -> None:
        self._owned_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="edge-agent-swtpm-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.binary = binary or shutil.which("swtpm") or "/usr/bin/swtpm"
        self.port = free_port_pair()
        self.log_path = self.state_dir / "swtpm.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        """The TCTI string tpm2-pytss and tpm2-tools accept for this simulator."""
        return f"swtpm:host={HOST},port={self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> SwtpmProcess:
        """Start swtpm and wait until its server port accepts connections."""
        if self.running:
            return self
        command = [
            self.binary, "socket", "--tpm2",
            "--tpmstate", f"dir={self.state_dir}",
            "--server", f"type=tcp,port={self.port},bindaddr={HOST}",
            "--ctrl", f"type=tcp,port={self.port + 1},bindaddr={HOST}",
            "--flags", "not-need-init,startup-clear",
            "--log", f"file={self.log_path}",
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                stderr = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise SigningError(f"swtpm exited with {self._proc.returncode}: {stderr.strip()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise SigningError(f"swtpm did not listen on {HOST}:{self.port} within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop swtpm gracefully (SIGTERM), so it writes its state."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Kill swtpm with SIGKILL, as a power cut would."""
        self._end(signal.SIGKILL, 10.0)

    def restart(self) -> SwtpmProcess:
        """Stop and start again on the same ports with the same TPM state."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop swtpm and remove the state directory if this object created it."""
        self.stop()
        if self._owned_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> SwtpmProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""A private PostgreSQL server on a free loopback port, for tests and benchmarks of the PostgreSQL store.

Never the machine's own server (which may listen on 5432): ``initdb`` makes a fresh cluster in a temporary
directory and ``pg_ctl`` runs it on a port nothing else uses, with its socket inside that directory. initdb
refuses to run as root, so under root the cluster belongs to ``nobody`` and every command runs through
``runuser``. Clients connect over TCP to 127.0.0.1 with trust authentication as ``postgres``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from agent.errors import AgentError
from agent.mqtt.localbroker import free_port

UNPRIVILEGED_USER = "nobody"


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's binaries (Debian's layout, else ``initdb`` on PATH), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(path.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PostgresServer:
    """``start()`` (creating the cluster the first time), ``stop()``, ``close()``; ``url(name)`` for Peewee."""

    def __init__(self, bin_dir: Path, *, fsync: bool = True) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.fsync = fsync
        self.workdir = Path(tempfile.mkdtemp(prefix="edge-fleet-pg-"))
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "postgres.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise AgentError("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
            self._as_user = ["runuser", "-u", UNPRIVILEGED_USER, "--"]
            shutil.chown(self.workdir, UNPRIVILEGED_USER)
        self._initialised = False

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self._as_user, *command], capture_output=True, text=True, cwd=self.workdir)
        if done.returncode != 0:
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise AgentError(f"{' '.join(command[:2])} failed: {done.stderr.strip()}\n{log[-2000:]}")

    def start(self) -> PostgresServer:
        """Start the server (initialising its cluster first if need be) and wait until it accepts connections."""
        if not self._initialised:
            self._run(str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync")  # fmt: skip
            self._initialised = True
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync={'on' if self.fsync else 'off'}"
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options,
                  "-w", "-t", "30", "start")  # fmt: skip
        return self

    def stop(self) -> None:
        """Stop the server now (``-m fast``: open connections are cut, as when a database goes down)."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def process_ids(self) -> list[int]:
        """The postmaster and its children (one backend per connection), for reading their CPU time."""
        postmaster = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
        return [postmaster, *children]

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        self._run(str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        """Stop the server if it runs and remove its cluster."""
        if self.running:
            self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

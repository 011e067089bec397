"""The deployment journal: transitions committed to a real SQLite file, read back after reopening."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.deploy.journal import Journal
from agent.errors import DeployError


def test_transitions_and_progress_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "deploy" / "journal.db"
    journal = Journal(path)
    journal.accept("d1", 4, "mcp/deploy/dev1", "{}", ("m@2", "m", "2"))
    journal.transition("d1", "verified")
    journal.transition("d1", "downloading")
    journal.chunk_done("m@2", "m.tflite", 0)
    journal.chunk_done("m@2", "m.tflite", 3)
    journal.chunk_done("m@2", "m.tflite", 3)
    journal.put_value("trust.last_signed_time", "123.5")
    journal.close()
    reopened = Journal(path)
    assert reopened.last_sequence() == 4
    [record] = reopened.unfinished()
    assert (record.state, [t.state for t in record.history]) == ("downloading", ["received", "verified", "downloading"])
    assert reopened.chunks_done("m@2", "m.tflite") == {0, 3}
    reopened.forget_chunks("m@2", "m.tflite", {3})
    assert reopened.chunks_done("m@2", "m.tflite") == {0}
    assert reopened.get_value("trust.last_signed_time") == "123.5"
    reopened.transition("d1", "failed", "no")
    with pytest.raises(DeployError, match="already failed"):
        reopened.transition("d1", "verified")
    assert reopened.unfinished() == [] and reopened.recent()[0].reason == "no"


def test_one_writer_while_readers_look(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    journal.accept("d1", 1, "t", "{}", None)
    with pytest.raises(DeployError, match="in use"):
        Journal(path)
    assert Journal(path, read_only=True).get("d1").state == "received"


def test_a_committed_transition_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    script = (
        "import os, sys\nfrom agent.deploy.journal import Journal\n"
        f"j = Journal({str(path)!r})\nj.accept('d1', 7, 't', '{{}}', None)\nj.transition('d1', 'verified')\n"
        "os.kill(os.getpid(), 9)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ}, timeout=60)
    assert result.returncode == -9
    journal = Journal(path)
    assert journal.get("d1").state == "verified" and journal.last_sequence() == 7


def test_any_thread_may_use_one_journal(tmp_path: Path) -> None:
    import threading

    journal = Journal(tmp_path / "journal.db")
    worker = threading.Thread(target=lambda: journal.accept("d1", 1, "t", "{}", None))
    worker.start()
    worker.join()
    assert journal.get("d1").state == "received"

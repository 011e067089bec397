"""Log lines: one parseable JSON object each, with extras; text at a terminal; journald priorities."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from agent.observe.logs import JsonFormatter, make_formatter, writes_to_journal


def emit(formatter: logging.Formatter, *, level: int = logging.INFO, exc: bool = False, **extra: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("agent.test-logs")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        if exc:
            try:
                raise ValueError("boom\nsecond line")
            except ValueError:
                logger.exception("failed serving %s", "alice", extra=extra)
        else:
            logger.log(level, 'request from %s with "quotes"\nand a newline', "alice", extra=extra)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_each_record_is_one_json_line_with_extras() -> None:
    output = emit(JsonFormatter(), client_id="alice", retry_after_ms=50, path=Path("/x"))
    lines = output.splitlines()
    assert len(lines) == 1
    document = json.loads(lines[0])
    assert document["level"] == "INFO" and document["logger"] == "agent.test-logs"
    assert document["msg"] == 'request from alice with "quotes"\nand a newline'
    assert document["ts"].endswith("Z") and "T" in document["ts"]
    assert document["thread"] == "MainThread"
    assert (document["client_id"], document["retry_after_ms"], document["path"]) == ("alice", 50, "/x")
    assert not {"args", "levelno", "pathname", "exc_info"} & set(document)


def test_an_exception_stays_on_the_one_line() -> None:
    lines = emit(JsonFormatter(), exc=True).splitlines()
    assert len(lines) == 1
    document = json.loads(lines[0])
    assert document["level"] == "ERROR" and document["msg"] == "failed serving alice"
    assert "ValueError: boom" in document["exc"] and "Traceback" in document["exc"]


def test_journald_lines_carry_the_syslog_priority() -> None:
    line = emit(JsonFormatter(syslog_priority=True), level=logging.WARNING).splitlines()[0]
    assert line.startswith("<4>{")
    assert json.loads(line[3:])["level"] == "WARNING"


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "other", "w") as other:
        stat = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        assert writes_to_journal(journal) and not writes_to_journal(other)
        formatter = make_formatter("json", journal)
        assert isinstance(formatter, JsonFormatter) and formatter.syslog_priority
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not writes_to_journal(journal)


def test_auto_is_json_for_a_pipe_and_text_for_a_terminal(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as file:
        assert isinstance(make_formatter("auto", file), JsonFormatter)
        assert not isinstance(make_formatter("text", file), JsonFormatter)
    primary, secondary = pty.openpty()
    try:
        with os.fdopen(secondary, "w", closefd=False) as terminal:
            assert not isinstance(make_formatter("auto", terminal), JsonFormatter)
            assert isinstance(make_formatter("json", terminal), JsonFormatter)
    finally:
        os.close(primary)
        os.close(secondary)


def test_the_agent_logs_json_lines_on_a_pipe(tmp_path: Path) -> None:
    """A real process whose stderr is a pipe, set up as ``edge-agent run`` sets up its logging."""
    script = (
        "from agent.cli import _setup_logging; import logging; "
        "_setup_logging('INFO', 'auto'); logging.getLogger('agent').warning('hello %s', 'pipe', extra={'n': 1})"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    document = json.loads(done.stderr.strip())
    assert (document["msg"], document["level"], document["n"]) == ("hello pipe", "WARNING", 1)

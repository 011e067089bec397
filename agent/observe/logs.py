"""Log output: one JSON object per line for machines, or plain text for a person at a terminal.

``log_format = "auto"`` (the default) writes JSON unless stderr is a terminal: under systemd, in a
container or redirected to a file, logs are read by tools (``journalctl -o cat | jq``, Loki, Vector), at
a terminal by a person. Each JSON line holds ``ts`` (UTC, RFC 3339, milliseconds), ``level``, ``logger``,
``thread``, ``msg``, ``exc`` when an exception is attached, and every ``extra={...}`` field given to the
logging call. When stderr is the journal's stream (systemd sets ``JOURNAL_STREAM``), each line starts
with the syslog priority (``<3>`` for errors, ...), which journald strips and records, so
``journalctl -p warning`` works on JSON lines as on text.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime
from typing import Any, Literal, TextIO

from agent.compat import UTC

LogFormat = Literal["auto", "json", "text"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON; values JSON cannot hold are written as their ``str()``."""

    def __init__(self, *, syslog_priority: bool = False) -> None:
        super().__init__()
        self.syslog_priority = syslog_priority

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            key: value for key, value in record.__dict__.items() if key not in _RECORD_ATTRIBUTES
        }
        document.update(
            ts=datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            level=record.levelname,
            logger=record.name,
            thread=record.threadName,
            msg=record.getMessage(),
        )
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(document, default=str, ensure_ascii=False)
        if self.syslog_priority:
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def writes_to_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journald stream systemd connected (``JOURNAL_STREAM`` names its device:inode)."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


def make_formatter(log_format: LogFormat, stream: TextIO) -> logging.Formatter:
    """The formatter ``log_format`` asks for on ``stream`` (``auto``: JSON unless it is a terminal)."""
    if log_format == "auto":
        log_format = "text" if stream.isatty() else "json"
    if log_format == "json":
        return JsonFormatter(syslog_priority=writes_to_journal(stream))
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, log_format: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Send the process's logs at ``level`` and above to ``stream`` (stderr) in ``log_format``."""
    target = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(target)
    handler.setFormatter(make_formatter(log_format, target))
    logging.basicConfig(level=level, handlers=[handler])

"""What differs between the Python versions the agent supports (3.10 to 3.13), kept in one place.

Everything here behaves the same on every version; on 3.11 and later it is the standard library itself.
"""

from __future__ import annotations

import sqlite3
import sys
from datetime import timezone

if sys.version_info >= (3, 11):
    import tomllib
else:  # tomli is the library that became tomllib in 3.11
    import tomli as tomllib

__all__ = [
    "UTC", "SQLITE_CORRUPT", "SQLITE_ERROR", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_NOTADB", "sqlite_error_code",
    "tomllib",
]  # fmt: skip

# datetime.UTC (3.11+) is this very object.
UTC = timezone.utc

# SQLite's primary result codes; the sqlite3 module exports them only from 3.11 on, and they never change.
SQLITE_ERROR = 1
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_NOTADB = 26

# Before 3.11 an sqlite3 error carries no code, only sqlite3_errstr()'s fixed English text for it.
_CODE_OF_MESSAGE = {
    "database disk image is malformed": SQLITE_CORRUPT,
    "file is not a database": SQLITE_NOTADB,
    "database or disk is full": SQLITE_FULL,
    "disk I/O error": SQLITE_IOERR,
}


def sqlite_error_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of one sqlite3 exception, or None if it is not one."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    if sys.version_info < (3, 11) and isinstance(exc, sqlite3.Error):
        message = str(exc)
        if message in _CODE_OF_MESSAGE:
            return _CODE_OF_MESSAGE[message]
        # Any other sqlite3 error (e.g. "no such table") is SQLITE_ERROR or a code the agent never checks.
        return SQLITE_ERROR
    return None

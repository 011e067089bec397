"""The outbox's SQL texts that vary with their rows: multi-row INSERTs and IN lists, in a few fixed shapes.

SQLite prepares every distinct statement text and keeps it in the connection's statement cache (128 of them);
a text per row count would fill it with programs that grow with their rows. These helpers keep the texts
the ledger (:mod:`agent.upstream.outbox_ledger`) builds to a handful of shapes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

SQL_CHUNK = 512  # ids per IN list: a power of two (see padded), within SQLite's smallest limit of 999
INSERT = "INSERT INTO outbox (msg_id, cls, body, size, enqueued_wall, enqueued_clock, expires_clock, state) VALUES "
INSERT_ROW = "(?, ?, ?, ?, ?, ?, ?, 'queued')"
ROWS_PER_INSERT = 128  # 7 parameters a row: within SQLite's smallest default limit of 999 per statement


def placeholders(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


def padded_chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    """``ids`` in lists of at most ``SQL_CHUNK`` for one ``IN`` each, every list :func:`padded`."""
    for start in range(0, len(ids), SQL_CHUNK):
        yield padded(ids[start : start + SQL_CHUNK])


def padded(ids: Sequence[int]) -> list[int]:
    """``ids`` with its last id repeated up to a power-of-two length (``IN`` ignores the repeats).

    Every distinct statement text is prepared and kept in the connection's statement cache (128 of them), and
    an ``IN`` list's program grows with its length: one text per list length kept up to 128 of them after
    claims and deliveries of every size, 2 MB of the agent's peak RSS under load (heaptrack). Padded, each
    statement has at most ten texts, for at most twice the parameters bound.
    """
    padded = list(ids)
    if padded:
        padded += padded[-1:] * ((1 << (len(padded) - 1).bit_length()) - len(padded))
    return padded


def insert_sizes(count: int) -> list[int]:
    """Rows per ``INSERT`` for ``count`` rows: full statements of ``ROWS_PER_INSERT``, the rest in powers of two.

    Every distinct statement text is prepared and kept in the connection's statement cache (128 of them), and
    a multi-row ``INSERT``'s program grows with its rows: one statement per remainder would keep up to 128
    of them, megabytes of SQLite memory held after a burst. Powers of two keep at most eight, for at most
    eight statements (eight GIL releases) per commit.
    """
    sizes = [ROWS_PER_INSERT] * (count // ROWS_PER_INSERT)
    rest = count % ROWS_PER_INSERT
    size = ROWS_PER_INSERT
    while rest:
        size //= 2
        if rest >= size:
            sizes.append(size)
            rest -= size
    return sizes

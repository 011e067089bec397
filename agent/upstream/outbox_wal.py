"""The outbox's files read directly, as SQLite lays them out: damage SQLite would pass over in silence, and the
committed pages of a WAL whose database file is gone.

SQLite opens a zero-length database as a new, empty one; it skips a WAL whose header is damaged, and stops
reading a WAL at a frame cut short. In each case the rows only it held are gone the next time the file is
written, and nothing is reported. The outbox writer therefore looks at the files before opening them
(:func:`damage_at_rest`) and treats what it finds as corruption: the files are moved aside as found, a
corruption event is recorded, and :mod:`agent.upstream.outbox_salvage` reads back what can be read, from the
WAL's committed frames too when the database file is empty (:func:`committed_pages`).

WAL format (https://www.sqlite.org/fileformat2.html#walformat): a 32-byte header (magic, version, page size,
checkpoint sequence, two salts, a checksum), then frames of a 24-byte header (page number, database size in
pages for a commit frame else 0, the salts, a cumulative checksum) and one page.
"""

from __future__ import annotations

import struct
from pathlib import Path

_MAGIC = (0x377F0682, 0x377F0683)  # the low bit: checksums on big-endian words
_VERSION = 3007000
_HEADER, _FRAME_HEADER = 32, 24


def damage_at_rest(path: Path) -> str | None:
    """Why the database at ``path`` or its -wal is damaged in a way SQLite would not report, or None."""
    try:
        if path.stat().st_size == 0:
            return "the database file is empty (zero length)"
    except FileNotFoundError:
        return None
    return wal_damage(Path(f"{path}-wal"))


def wal_damage(wal: Path) -> str | None:
    """Why a WAL is damaged (a bad header, or cut short inside a frame), or None: absent, empty or sound.

    A file that ends exactly 24 bytes into a frame is an append interrupted between a frame's header and its
    page (SQLite writes them separately): that transaction never committed, nothing is lost.
    """
    try:
        size = wal.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with open(wal, "rb") as handle:
        header = _read_header(handle.read(_HEADER))
        if isinstance(header, str):
            return header
        page_size, salts, _ = header
        frame = _FRAME_HEADER + page_size
        offset = _HEADER
        while offset + frame <= size:
            handle.seek(offset + 8)
            if handle.read(8) != salts:
                return None  # frames of an earlier generation follow: SQLite ignores them, rightly
            offset += frame
        tail = size - offset
        if tail in (0, _FRAME_HEADER):
            return None
        handle.seek(offset)
        partial = handle.read(16)
    if len(partial) < 16 or partial[8:16] == salts:
        return f"the -wal is cut short inside frame {(offset - _HEADER) // frame + 1} ({size} bytes)"
    return None


def committed_pages(wal: Path) -> tuple[int, dict[int, bytes]] | None:
    """The page size and the latest committed image of each page in a WAL, frames checked as SQLite checks
    them (salts, cumulative checksums); None if the WAL has no usable header."""
    data = wal.read_bytes()
    header = _read_header(data[:_HEADER])
    if isinstance(header, str):
        return None
    page_size, salts, sums = header
    big_endian = data[3] & 1 == 1
    pages: dict[int, bytes] = {}
    pending: dict[int, bytes] = {}
    offset = _HEADER
    while offset + _FRAME_HEADER + page_size <= len(data):
        frame_header = data[offset : offset + _FRAME_HEADER]
        page = data[offset + _FRAME_HEADER : offset + _FRAME_HEADER + page_size]
        page_number, commit_size = struct.unpack(">II", frame_header[:8])
        sums = _checksum(page, big_endian, *_checksum(frame_header[:8], big_endian, *sums))
        if frame_header[8:16] != salts or struct.unpack(">II", frame_header[16:24]) != sums:
            break
        pending[page_number] = page
        if commit_size:
            pages.update(pending)
            pending.clear()
        offset += _FRAME_HEADER + page_size
    return page_size, pages


def _read_header(header: bytes) -> tuple[int, bytes, tuple[int, int]] | str:
    if len(header) < _HEADER:
        return f"the -wal is {len(header)} bytes, shorter than a WAL header"
    magic, version, page_size = struct.unpack(">III", header[:12])
    if magic not in _MAGIC or version != _VERSION or page_size < 512 or page_size & (page_size - 1):
        return "the -wal does not start with a WAL header"
    sums = struct.unpack(">II", header[24:32])
    if _checksum(header[:24], bool(magic & 1), 0, 0) != sums:
        return "the -wal header fails its checksum"
    return page_size, header[16:24], sums


def _checksum(data: bytes, big_endian: bool, first: int, second: int) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for index in range(0, len(words), 2):
        first = (first + words[index] + second) & 0xFFFFFFFF
        second = (second + words[index + 1] + first) & 0xFFFFFFFF
    return first, second

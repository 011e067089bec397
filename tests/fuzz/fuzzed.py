"""Turning one fuzzer input into structured values, without atheris.

``atheris.FuzzedDataProvider`` would do this too, but its encoding differs between atheris versions and the
committed corpus must replay where atheris is not installed. Values are read front to back; an exhausted
input yields zeros and empty strings, so every input decodes to something. :func:`encode` writes the same
format, for hand-made seeds.
"""

from __future__ import annotations

import struct
from typing import TypeVar

T = TypeVar("T")


class FuzzedInput:
    """A cursor over the fuzzer's bytes."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def remaining(self) -> int:
        return len(self._data) - self._at

    def byte(self) -> int:
        """One unsigned byte (0 once exhausted)."""
        return self.uint(1)

    def uint(self, size: int) -> int:
        """An unsigned little-endian integer of ``size`` bytes, zero-padded once exhausted."""
        chunk = self._data[self._at : self._at + size]
        self._at += len(chunk)
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def pick(self, choices: list[T] | tuple[T, ...]) -> T:
        return choices[self.byte() % len(choices)]

    def pick_text(self, choices: list[str] | tuple[str, ...], limit: int = 65_535) -> str:
        """One of ``choices``, or (one choice in ``len(choices) + 1``) a fuzzed string read only then."""
        index = self.byte() % (len(choices) + 1)
        return choices[index] if index < len(choices) else self.text(limit)

    def chunk(self, limit: int = 65_535) -> bytes:
        """Bytes preceded by a 2-byte length (capped at ``limit`` and at what is left)."""
        size = min(self.uint(2), limit, self.remaining())
        value = self._data[self._at : self._at + size]
        self._at += size
        return value

    def text(self, limit: int = 65_535) -> str:
        """A length-prefixed string; invalid UTF-8 becomes surrogates, which every str consumer must survive."""
        return self.chunk(limit).decode("utf-8", "surrogateescape")

    def rest(self) -> bytes:
        value = self._data[self._at :]
        self._at = len(self._data)
        return value


def encode(*values: object) -> bytes:
    """Encode seed values for :class:`FuzzedInput`: ints as one byte, bool as one byte, bytes/str as chunks.

    A final ``bytes`` read with :meth:`FuzzedInput.rest` is appended raw by passing it through ``raw()``.
    """
    out = bytearray()
    for value in values:
        if isinstance(value, Raw):
            out += value.data
        elif isinstance(value, (bool, int)):
            out.append(int(value) & 0xFF)
        else:
            data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
            out += struct.pack("<H", len(data)) + data
    return bytes(out)


class Raw:
    """Bytes :func:`encode` appends as they are (for a trailing :meth:`FuzzedInput.rest`, or a wide integer)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def u16(value: int) -> Raw:
    return Raw(struct.pack("<H", value))


def u32(value: int) -> Raw:
    return Raw(struct.pack("<I", value))

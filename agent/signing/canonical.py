"""The JSON form every signed message takes: RFC 8785 (JCS) canonical bytes of a JCS-safe value.

JCS serialises numbers as IEEE 754 doubles the way ECMAScript does, so some Python values have no JCS form.
Before signing (and before sending), the agent normalises each message with :func:`normalise`:

============================  ============================================================================
Python value                  Sent and signed as
============================  ============================================================================
``float('nan')``              the string ``"NaN"``
``float('inf')`` / ``-inf``   the strings ``"Infinity"`` / ``"-Infinity"``
int with ``|n| > 2**53 - 1``  its decimal string, e.g. ``"18446744073709551615"``
``-0.0``                      ``0`` (JCS has no negative zero)
str with lone surrogates      the string with each lone surrogate replaced by U+FFFD
tuple                         array
numbers.Integral / Real       int / float (numpy scalars included, without importing numpy)
============================  ============================================================================

These are the encodings of the proto3 JSON mapping for doubles and 64-bit integers, so generic consumers
already know them. Anything else (bytes, sets, non-string keys, objects) is refused.

A verifier parses received JSON with :func:`parse_json`, which reads numbers the way JCS defines them
(every number is a double: integers beyond 2**53 become floats), so re-canonicalising the parsed message
reproduces the signed bytes exactly.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import rfc8785

from agent.errors import SigningError

MAX_SAFE_INTEGER = 2**53 - 1
_STRING_LITERAL = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
# Outside strings, Python and ECMAScript agree on a number's digits (both shortest round-trip); they differ
# on exponents, on integral floats ("2.0" against "2"), and beyond 2**53 (16+ integer digits go the exact
# path, to be safe). Outside strings, "e"/"E" only occur in exponents and in true/false.
_INTEGRAL_FLOAT = re.compile(r"\.0[,\]}]")
_LONG_INTEGER = re.compile(r"[-:,\[]\d{16}")
_BEYOND_D7FF = re.compile("[\ud800-\U0010ffff]")
NAN = "NaN"
POSITIVE_INFINITY = "Infinity"
NEGATIVE_INFINITY = "-Infinity"

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]
# json.dumps with any option builds an encoder per call; these are shared (encoding keeps no state in them).
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_COMPACT_SORTED = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=True)


def normalise(value: Any) -> JsonValue:
    """Return a copy of ``value`` that JCS can serialise, using the encodings in this module's docstring.

    Idempotent: ``normalise(normalise(v)) == normalise(v)``. Raises :class:`SigningError` for values that
    have no JSON form.
    """
    # Exact built-in types first: the numbers ABCs' isinstance checks cost ~1 us each, several per value.
    kind = type(value)
    if kind is str:
        return value if value.isascii() else _safe_str(value)
    if kind is float:
        return _normalise_float(value)
    if kind is int:
        return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else str(value)
    if kind is dict:
        out: dict[str, JsonValue] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise SigningError(f"object key {key!r} is not a string: no JSON form")
            # Inline for the commonest values (an ASCII string; a finite, non-zero float, the one case where
            # "x - x == 0.0" and "x != 0" both hold), whose normal form is themselves: no call per value.
            item_kind = type(item)
            own_form = (item_kind is str and item.isascii()) or (
                item_kind is float and item - item == 0.0 and item != 0.0
            )
            out[key if key.isascii() else _safe_str(key)] = item if own_form else normalise(item)
        return out
    if kind is list:
        return [
            item if type(item) is float and item - item == 0.0 and item != 0.0 else normalise(item) for item in value
        ]
    if value is None or isinstance(value, (bool, str)):
        return _safe_str(value) if isinstance(value, str) else value
    if isinstance(value, numbers.Integral):
        number = int(value)
        return number if abs(number) <= MAX_SAFE_INTEGER else str(number)
    if isinstance(value, numbers.Real):
        return _normalise_float(float(value))
    if isinstance(value, Mapping):
        return normalise(dict(value))
    if isinstance(value, (list, tuple)):
        return [normalise(item) for item in value]
    raise SigningError(f"a {type(value).__name__} has no JSON form")


def canonical_bytes(value: JsonValue) -> bytes:
    """RFC 8785 canonical UTF-8 bytes of an already normalised value.

    The C JSON encoder with sorted keys produces exactly the JCS bytes unless a number is written
    differently (an exponent, an integral float such as ``2.0``, an integer beyond 2**53) or a key could
    sort differently in UTF-16 (characters above U+D7FF); only then does the pure-Python ``rfc8785`` run.
    That keeps signing a typical reply about five times cheaper (tests compare both on arbitrary values).
    """
    return canonical_text(value).encode("utf-8")


def canonical_text(value: JsonValue) -> str:
    """:func:`canonical_bytes` as text (for splicing a member in or out without decoding again)."""
    fast = _plain_json(value, sort_keys=True)
    if fast is not None:
        return fast
    try:
        return rfc8785.dumps(value).decode("utf-8")
    except (rfc8785.CanonicalizationError, UnicodeError, TypeError) as exc:
        raise SigningError(f"value is not JCS-safe (normalise it first): {exc}") from None


def _outside_strings(text: str) -> str:
    """``text`` with each string literal emptied to ``""``.

    Without a backslash no quote is escaped, so splitting on quotes separates literals at C speed; the
    regex costs ~4 us per KB, 0.3 ms for a reply carrying base64 tensors.
    """
    if "\\" in text:
        return _STRING_LITERAL.sub('""', text)
    return '""'.join(text.split('"')[::2])


def _numbers_differ(outside_strings: str) -> bool:
    words_removed = outside_strings.replace("true", "").replace("false", "")
    return (
        "e" in words_removed
        or "E" in words_removed
        or _INTEGRAL_FLOAT.search(outside_strings) is not None
        or _LONG_INTEGER.search(outside_strings) is not None
    )


def _plain_json(value: Any, *, sort_keys: bool) -> str | None:
    """Compact JSON of ``value`` when every number and key is written alike by Python and by JCS, else None."""
    try:
        text = (_COMPACT_SORTED if sort_keys else _COMPACT).encode(value)
    except (TypeError, ValueError):
        return None
    # The commas around make a bare top-level number look like one inside an array.
    if (not text.isascii() and _BEYOND_D7FF.search(text)) or _numbers_differ("," + _outside_strings(text) + ","):
        return None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: only an unnormalised value holds one
            return None
    return text


def encode_message(message: Mapping[str, Any]) -> bytes:
    """Compact JSON bytes to publish for a normalised message (what ``sign_reply``/``sign_record`` return).

    The wire form need not be canonical: verifiers re-canonicalise what they parse, and every value of a
    normalised message parses back to itself. So this uses the C JSON encoder, several times faster than
    JCS. Refuses NaN/Infinity, which only an unnormalised message could contain.
    """
    try:
        return _COMPACT.encode(message).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise SigningError(f"message is not normalised JSON: {exc}") from None


def parse_json(data: bytes | str) -> Any:
    """Parse JSON with JCS number semantics; refuse the non-standard NaN/Infinity literals."""
    try:
        return json.loads(data, parse_int=_parse_int, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SigningError(f"not valid JSON: {exc}") from None
    except RecursionError:  # deep nesting; not a ValueError (found by make fuzz: deploy_document)
        raise SigningError("not valid JSON: nested too deeply") from None


def _normalise_float(number: float) -> float | int | str:
    if math.isnan(number):
        return NAN
    if math.isinf(number):
        return POSITIVE_INFINITY if number > 0 else NEGATIVE_INFINITY
    return 0 if number == 0 else number


def _safe_str(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _parse_int(literal: str) -> int | float:
    number = int(literal)
    return number if abs(number) <= MAX_SAFE_INTEGER else float(number)


def _refuse_constant(literal: str) -> None:
    raise ValueError(f"{literal} is not JSON")

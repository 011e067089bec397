"""The bytes the agent publishes: replies and records, signed when signing is configured, JSON either way.

Values JSON (and JCS) cannot carry — NaN, infinities, integers beyond 2**53 — take the encodings of
:func:`agent.signing.canonical.normalise` (docs/signing.md), signed or not, so a client sees one format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from agent.errors import SigningError
from agent.signing import (
    ReplyBinding,
    Signer,
    encode_message,
    encode_signed_reply,
    normalise,
    sign_record,
)


def encode_unsigned(message: Mapping[str, Any]) -> bytes:
    """Compact JSON of a message, with the values JSON cannot carry normalised.

    Normalising walks every value in Python (about 12 ms for the 15k floats of a face detector's outputs),
    so only messages the C encoder refuses (non-finite floats, lone surrogates) pay for it.
    """
    try:
        return encode_message(message)
    except SigningError:
        return encode_message(cast(dict[str, Any], normalise(message)))  # a Mapping normalises to a dict


def encode_reply(reply: Mapping[str, Any], signer: Signer | None, *, client_id: str, request_sha256: str) -> bytes:
    """A JSON-RPC reply to publish; signed and bound to the request (the hex SHA-256 of its raw payload) if ``signer``.

    Raises :class:`SigningError` if the signer fails; the reply must then not be published unsigned.
    """
    if signer is None:
        return encode_unsigned(reply)
    binding = ReplyBinding(client_id=client_id, request_id=reply.get("id"), request_sha256=request_sha256)
    return encode_signed_reply(reply, signer, binding)


def encode_record(record: Mapping[str, Any], signer: Signer | None) -> bytes:
    """A status document or other record to publish, with a top-level ``sig`` if ``signer``."""
    if signer is None:
        return encode_unsigned(record)
    return encode_message(sign_record(record, signer))

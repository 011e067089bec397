"""Detached compact JWS (RFC 7515 Appendix F) with ES256: ``BASE64URL(header) + ".." + BASE64URL(R || S)``.

The payload is not carried in the token: the verifier rebuilds it (the canonical message bytes) and forms
the signing input ``BASE64URL(header) + "." + BASE64URL(payload)`` itself. The protected header is the JCS
form of ``{"alg": "ES256", "kid": ..., "iat": ..., "x5c" | "x5t#S256": ...}``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

import pybase64
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature

from agent.errors import SignatureInvalid
from agent.signing.canonical import JsonValue, canonical_bytes

ALGORITHM = "ES256"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
COORDINATE_BYTES = 32
# ES256 over a SHA-256 digest the caller computed (keys sign digests, as a TPM does); immutable, so shared.
ES256_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url, as JOSE uses everywhere."""
    return pybase64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url; raise :class:`SignatureInvalid` on anything else."""
    if not _BASE64URL.fullmatch(text):
        raise SignatureInvalid("malformed", "not base64url")
    try:
        data = pybase64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise SignatureInvalid("malformed", f"not base64url: {exc}") from None
    if b64url_encode(data) != text:
        # Stray bits in the last character would let two strings carry the same signature.
        raise SignatureInvalid("malformed", "not canonical base64url")
    return data


def raw_signature(r: int, s: int) -> bytes:
    """JWS ES256 signature bytes: R and S, each left-padded to 32 bytes."""
    return r.to_bytes(COORDINATE_BYTES, "big") + s.to_bytes(COORDINATE_BYTES, "big")


def raw_from_der(der: bytes) -> bytes:
    """Convert an ASN.1 DER ECDSA signature (what OpenSSL produces) to raw R || S."""
    r, s = decode_dss_signature(der)
    return raw_signature(r, s)


def der_from_raw(raw: bytes) -> bytes:
    """Convert raw R || S to the DER form X.509 and ``cryptography`` verification use."""
    if len(raw) != 2 * COORDINATE_BYTES:
        raise SignatureInvalid("malformed", f"an ES256 signature has 64 bytes, not {len(raw)}")
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def jwk_thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 SHA-256 thumbprint of a P-256 public key, used as ``kid``."""
    numbers = public_key.public_numbers()
    jwk: dict[str, JsonValue] = {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url_encode(numbers.x.to_bytes(COORDINATE_BYTES, "big")),
        "y": b64url_encode(numbers.y.to_bytes(COORDINATE_BYTES, "big")),
    }
    return b64url_encode(hashlib.sha256(canonical_bytes(jwk)).digest())


def signing_input(encoded_header: str, payload: bytes) -> bytes:
    """The bytes ES256 signs: ``BASE64URL(header) "." BASE64URL(payload)``."""
    return f"{encoded_header}.{b64url_encode(payload)}".encode("ascii")


def protected_header(header: dict[str, Any]) -> str:
    """``BASE64URL`` of the JCS form of ``header`` with ``alg`` set: the first part of a compact JWS."""
    return b64url_encode(canonical_bytes({**header, "alg": ALGORITHM}))


def sign_detached(header: dict[str, Any] | str, payload: bytes, sign_digest: Callable[[bytes], bytes]) -> str:
    """Build a detached compact JWS; ``sign_digest`` turns a SHA-256 digest into a raw R || S signature.

    ``header`` is the header object, or its :func:`protected_header` form when the caller reuses one.
    """
    encoded_header = header if isinstance(header, str) else protected_header(header)
    digest = hashlib.sha256(signing_input(encoded_header, payload)).digest()
    return f"{encoded_header}..{b64url_encode(sign_digest(digest))}"


def header_hash(encoded_header: str) -> Any:
    """SHA-256 already fed ``BASE64URL(header) "."``: the start of the signing input of every payload signed
    under that header, for :func:`sign_detached_after`."""
    return hashlib.sha256(f"{encoded_header}.".encode("ascii"))


def sign_detached_after(
    encoded_header: str, hashed_header: Any, payload: bytes, sign_digest: Callable[[bytes], bytes]
) -> str:
    """:func:`sign_detached` for a header reused across payloads, with its :func:`header_hash`: only the
    payload is hashed per message (a delegated signer's header with ``x5c`` is 1.3 KB, twice a small reply)."""
    state = hashed_header.copy()
    state.update(pybase64.urlsafe_b64encode(payload).rstrip(b"="))
    return f"{encoded_header}..{b64url_encode(sign_digest(state.digest()))}"


def parse_detached(token: str) -> tuple[dict[str, Any], str, bytes]:
    """Split a detached compact JWS into (header, encoded header, raw signature); check alg is ES256."""
    if not isinstance(token, str):
        raise SignatureInvalid("malformed", "the signature is not a string")
    parts = token.split(".")
    if len(parts) != 3 or parts[1] != "":
        raise SignatureInvalid("malformed", "the signature is not a detached compact JWS (header..signature)")
    encoded_header, _, encoded_signature = parts
    try:
        header = json.loads(b64url_decode(encoded_header))
    except ValueError:
        raise SignatureInvalid("malformed", "the JWS header is not JSON") from None
    if not isinstance(header, dict):
        raise SignatureInvalid("malformed", "the JWS header is not a JSON object")
    if header.get("alg") != ALGORITHM:
        raise SignatureInvalid("malformed", f"JWS alg {header.get('alg')!r} is not {ALGORITHM}")
    if "crit" in header:
        raise SignatureInvalid("malformed", "JWS crit header parameters are not supported")
    signature = b64url_decode(encoded_signature)
    if len(signature) != 2 * COORDINATE_BYTES:
        raise SignatureInvalid("malformed", f"an ES256 signature has 64 bytes, not {len(signature)}")
    return header, encoded_header, signature


def verify_detached(token: str, payload: bytes, public_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """Check a detached compact JWS over ``payload`` with ``public_key``; return its protected header."""
    header, encoded_header, signature = parse_detached(token)
    try:
        public_key.verify(der_from_raw(signature), signing_input(encoded_header, payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalid("bad_signature", "the signature does not match the message") from None
    return header

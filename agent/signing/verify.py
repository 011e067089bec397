"""Verify a captured message with nothing but the device's public key.

Steps (docs/signing.md describes them for other implementations):

1. Parse the JSON (numbers as JCS doubles) and find the one ``sig`` member (top level, ``result._meta`` or
   ``error.data``); remove it and take the JCS bytes of what remains: the payload.
2. Parse the detached JWS; ``alg`` must be ES256. Pick the key: with ``x5c`` (or ``x5t#S256`` and a known
   certificate) the delegation certificate's key, after checking that the device key issued the certificate,
   that it is valid at the header's ``iat`` and names the device; without either, the device key itself.
3. Check the ES256 signature over ``BASE64URL(header) "." BASE64URL(payload)``.
4. For replies: ``_meta.iat`` equals the header's ``iat``, ``device_id`` matches the certificate, and
   ``request_sha256`` equals the digest of the request the caller sent, if the caller says which.
"""

from __future__ import annotations

import base64
import binascii
import copy
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from agent.compat import UTC
from agent.errors import SignatureInvalid, SigningError
from agent.signing.canonical import canonical_bytes, parse_json
from agent.signing.delegation import (
    certificate_device_id,
    certificate_thumbprint,
    check_certificate_at,
    check_issued_by_device,
)
from agent.signing.jws import parse_detached, verify_detached
from agent.signing.message import SIG, signature_holders
from agent.signing.roots import load_public_key, public_key_der

# A message stamped further ahead of the verifier's clock than this was not signed by an honest device.
MAX_CLOCK_SKEW_S = 300


class CheckedCertificates:
    """Delegation certificates already found issued by a device key, for a verifier of many messages (the
    fleet ingest): the issuer's signature is then checked once per certificate instead of once per message.
    Validity at each message's ``iat`` is still checked every time. Bounded; for one thread."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._checked: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()

    def check(self, certificate: x509.Certificate, device_key: ec.EllipticCurvePublicKey) -> None:
        """:func:`check_issued_by_device`, remembered when it passes."""
        key = (certificate.signature, public_key_der(device_key))
        if key in self._checked:
            self._checked.move_to_end(key)
            return
        check_issued_by_device(certificate, device_key)
        self._checked[key] = None
        if len(self._checked) > self._capacity:
            self._checked.popitem(last=False)


@dataclass(frozen=True)
class VerifiedMessage:
    """A message whose signature checked out, and what the signature established."""

    message: dict[str, Any]
    mode: Literal["strict", "delegated"]
    kid: str | None
    iat: int
    device_id: str | None
    certificate: x509.Certificate | None
    binding: dict[str, Any] | None


def verify_message(
    message: bytes | str | Mapping[str, Any],
    device_public_key: ec.EllipticCurvePublicKey | bytes | str,
    *,
    expected_request_sha256: str | None = None,
    expected_device_id: str | None = None,
    certificates: Iterable[x509.Certificate] = (),
    now: float | None = None,
    checked: CheckedCertificates | None = None,
) -> VerifiedMessage:
    """Verify ``message`` (raw bytes as published, or parsed) against the device public key (PEM/DER/key).

    Raises :class:`SignatureInvalid` whose ``reason`` says why: unsigned, malformed, bad_signature,
    certificate_invalid, certificate_expired, foreign_certificate, request_mismatch, device_mismatch.
    ``certificates`` are the delegation certificates known out of band, for messages that reference theirs
    by ``x5t#S256``; ``now`` (POSIX seconds) bounds how far in the future ``iat`` may be; ``checked``
    remembers certificates already found issued by the device key.
    """
    device_key = load_public_key(device_public_key)
    parsed = _parse(message)
    holders = signature_holders(parsed)
    if not holders:
        raise SignatureInvalid("unsigned", "the message carries no signature (no sig member)")
    if len(holders) > 1:
        raise SignatureInvalid("malformed", "the message carries more than one sig member")
    unsigned = copy.deepcopy(parsed)
    holder = signature_holders(unsigned)[0]
    token = holder.pop(SIG)
    binding = None if holder is unsigned else holder  # a reply's sig sits with its binding
    try:
        payload = canonical_bytes(unsigned)
    except SigningError as exc:
        raise SignatureInvalid("malformed", str(exc)) from None

    header, _, _ = parse_detached(token)
    iat = header.get("iat")
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise SignatureInvalid("malformed", "the JWS header has no integer iat")
    if iat > (time.time() if now is None else now) + MAX_CLOCK_SKEW_S:
        raise SignatureInvalid("malformed", f"iat {iat} is in the future")

    certificate = _delegation_certificate(header, certificates)
    if certificate is not None:
        if checked is not None:
            checked.check(certificate, device_key)
        else:
            check_issued_by_device(certificate, device_key)
        check_certificate_at(certificate, at=datetime.fromtimestamp(iat, UTC), device_id=expected_device_id)
        signing_key = certificate.public_key()
        assert isinstance(signing_key, ec.EllipticCurvePublicKey)  # checked by check_issued_by_device
    else:
        signing_key = device_key
    verify_detached(token, payload, signing_key)

    _check_binding(binding, iat, certificate, expected_request_sha256, expected_device_id)
    return VerifiedMessage(
        message=parsed,
        mode="delegated" if certificate is not None else "strict",
        kid=header.get("kid") if isinstance(header.get("kid"), str) else None,
        iat=iat,
        device_id=certificate_device_id(certificate) if certificate is not None else (binding or {}).get("device_id"),
        certificate=certificate,
        binding=binding,
    )


def _parse(message: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(message, Mapping):
        return dict(message)
    try:
        parsed = parse_json(message)
    except SigningError as exc:
        raise SignatureInvalid("malformed", str(exc)) from None
    if not isinstance(parsed, dict):
        raise SignatureInvalid("malformed", "the message is not a JSON object")
    return parsed


def _delegation_certificate(header: dict[str, Any], known: Iterable[x509.Certificate]) -> x509.Certificate | None:
    if "x5c" in header:
        chain = header["x5c"]
        if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
            raise SignatureInvalid("malformed", "x5c is not a list of base64 certificates")
        try:
            with warnings.catch_warnings():
                # cryptography still loads some invalid certificates (e.g. negative serials) with a warning.
                warnings.simplefilter("error", CryptographyDeprecationWarning)
                return x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
        except (ValueError, binascii.Error, CryptographyDeprecationWarning) as exc:
            raise SignatureInvalid("certificate_invalid", f"x5c[0] is not a DER certificate: {exc}") from None
    if "x5t#S256" in header:
        thumbprint = header["x5t#S256"]
        for certificate in known:
            if certificate_thumbprint(certificate.public_bytes(Encoding.DER)) == thumbprint:
                return certificate
        raise SignatureInvalid(
            "certificate_invalid", f"the delegation certificate x5t#S256={thumbprint} is not among those given"
        )
    return None


def _check_binding(
    binding: dict[str, Any] | None,
    iat: int,
    certificate: x509.Certificate | None,
    expected_request_sha256: str | None,
    expected_device_id: str | None,
) -> None:
    if binding is None:
        if expected_request_sha256 is not None:
            raise SignatureInvalid("request_mismatch", "the message is not a reply bound to a request")
        return
    if binding.get("iat") != iat:
        raise SignatureInvalid("malformed", f"_meta.iat {binding.get('iat')!r} differs from the signature's iat {iat}")
    device_id = binding.get("device_id")
    if certificate is not None and device_id != certificate_device_id(certificate):
        raise SignatureInvalid(
            "device_mismatch",
            f"the reply names device {device_id!r}, its certificate {certificate_device_id(certificate)!r}",
        )
    if expected_device_id is not None and device_id != expected_device_id:
        raise SignatureInvalid("device_mismatch", f"the reply is from {device_id!r}, not {expected_device_id!r}")
    if expected_request_sha256 is not None and binding.get("request_sha256") != expected_request_sha256:
        raise SignatureInvalid(
            "request_mismatch",
            f"the reply answers request sha256 {binding.get('request_sha256')!r}, not {expected_request_sha256!r}",
        )

"""Whether a record came from the device it names: its signature chain back to the device key in the inventory.

A record is trusted only if its signature verifies (``agent.signing.verify_message``, the same code as
``edge-agent verify``) with the key the fleet CA certified for the device in the topic, and the envelope
agrees with what the signature covers. A record signed by a delegated key that names its certificate by
``x5t#S256`` needs that certificate: devices send each one upstream as an audit record of kind
``delegation_certificate``; until it has arrived the record is *held*, not rejected.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from agent.errors import SignatureInvalid
from agent.signing import load_public_key, verify_message
from agent.signing.delegation import certificate_thumbprint, check_certificate_at, check_issued_by_device
from agent.signing.jws import parse_detached
from agent.signing.message import SIG, signature_holders
from agent.signing.verify import CheckedCertificates
from agent.upstream.uplink_wire import UpstreamRecord
from provisioning.records import Inventory, load_document

CERTIFICATE_KIND = "delegation_certificate"
THUMBPRINT_HEADER = "x5t#S256"
Outcome = Literal["store", "quarantine", "hold"]
MAX_MSG_ID, MAX_CLASS = 64, 16  # the columns' sizes; devices send UUIDs and short class names


@dataclass(frozen=True)
class Verdict:
    """What to do with one record: store it (with what its signature established), quarantine it, or hold it."""

    outcome: Outcome
    record: UpstreamRecord
    reason: str = ""
    detail: str = ""
    thumbprint: str | None = None
    signed_at: int = 0
    signer: str = ""
    kid: str | None = None
    client_id: str | None = None
    method: str | None = None
    certificate: x509.Certificate | None = None


class DeviceKeys:
    """The device keys of the fleet inventory, read again whenever the file changes (a newly signed device
    is recognised without restarting the ingest)."""

    def __init__(self, inventory_path: Path) -> None:
        self.inventory_path = inventory_path
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, ec.EllipticCurvePublicKey | str] = {}

    def refresh(self) -> None:
        """Reload the inventory if it changed since the last read."""
        stat = os.stat(self.inventory_path)
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        inventory = load_document(Inventory, self.inventory_path)
        keys: dict[str, ec.EllipticCurvePublicKey | str] = {}
        for device_id, entry in inventory.devices.items():
            keys[device_id] = load_public_key(entry.public_key_pem) if entry.status == "active" else "device_revoked"
        self._keys, self._stamp = keys, stamp

    def key(self, device_id: str) -> ec.EllipticCurvePublicKey | str:
        """The device's public key, or why there is none (``unknown_device``, ``device_revoked``)."""
        return self._keys.get(device_id, "unknown_device")


class CertificateCache:
    """Delegation certificates already checked, by thumbprint; misses go to ``load`` (the database)."""

    def __init__(self, load: Callable[[str], x509.Certificate | None], capacity: int = 4096) -> None:
        self._load = load
        self._capacity = capacity
        self._known: OrderedDict[str, x509.Certificate] = OrderedDict()

    def add(self, thumbprint: str, certificate: x509.Certificate) -> None:
        self._known[thumbprint] = certificate
        self._known.move_to_end(thumbprint)
        while len(self._known) > self._capacity:
            self._known.popitem(last=False)

    def get(self, thumbprint: str) -> x509.Certificate | None:
        """The certificate, from memory or the database; None if it has not arrived."""
        certificate = self._known.get(thumbprint)
        if certificate is None:
            certificate = self._load(thumbprint)
            if certificate is not None:
                self.add(thumbprint, certificate)
        return certificate


class Verifier:
    """Turns a decoded record into a :class:`Verdict`."""

    def __init__(self, keys: DeviceKeys, certificates: CertificateCache) -> None:
        self.keys = keys
        self.certificates = certificates
        self.checked = CheckedCertificates()  # x5c: each certificate's issuer checked once, not per record

    def check(self, topic_device: str, record: UpstreamRecord, now: float) -> Verdict:
        """Verify one record that arrived on a topic of ``topic_device``."""
        try:
            return self._check(topic_device, record, now)
        except SignatureInvalid as exc:
            return Verdict("quarantine", record, reason=exc.reason, detail=str(exc))

    def _check(self, topic_device: str, record: UpstreamRecord, now: float) -> Verdict:
        if len(record.msg_id) > MAX_MSG_ID or len(record.cls) > MAX_CLASS or not 0 <= record.seq < 2**63:
            raise SignatureInvalid("malformed", "msg_id, class or seq out of the range devices send")
        if record.device_id != topic_device:
            raise SignatureInvalid("device_mismatch", f"the envelope names {record.device_id!r}, the topic {topic_device!r}")
        key = self.keys.key(record.device_id)
        if isinstance(key, str):
            return Verdict("quarantine", record, reason=key, detail=f"device {record.device_id!r}: {key}")
        body = record.body
        if not isinstance(body, dict):
            raise SignatureInvalid("malformed", "the record's body is not a JSON object")
        message = _signed_message(record, body)
        certificate = _carried_certificate(record, body, key)
        if certificate is not None:
            self.certificates.add(certificate_thumbprint(certificate.public_bytes(Encoding.DER)), certificate)
        known: list[x509.Certificate] = []
        thumbprint = _referenced_thumbprint(message)
        if thumbprint is not None:
            found = self.certificates.get(thumbprint)
            if found is None:
                return Verdict("hold", record, thumbprint=thumbprint, certificate=certificate)
            known.append(found)
        verified = verify_message(
            message, key, expected_device_id=record.device_id, certificates=known, now=now, checked=self.checked
        )
        client_id = method = None
        if record.cls == "res":
            binding = verified.binding or {}
            client_id, method = body.get("client_id"), body.get("method")
            if binding.get("client_id") != client_id:
                raise SignatureInvalid(
                    "envelope_mismatch", f"the record names client {client_id!r}, its reply {binding.get('client_id')!r}"
                )
        if any("\x00" in value for value in (client_id, method, verified.kid) if isinstance(value, str)):
            raise SignatureInvalid("malformed", "a NUL character in client_id, method or kid")
        return Verdict(
            "store",
            record,
            signed_at=verified.iat,
            signer=verified.mode,
            kid=verified.kid,
            client_id=client_id if isinstance(client_id, str) else None,
            method=method if isinstance(method, str) else None,
            certificate=certificate,
        )


def _signed_message(record: UpstreamRecord, body: dict[str, Any]) -> dict[str, Any]:
    """The part of the body that carries the signature, after checking that the envelope matches it.

    A reply's upstream copy is not signed again: its ``reply`` is, and binds device and client. Every other
    record is signed whole, including its ``msg_id``, ``device_id`` and ``class``.
    """
    if record.cls == "res":
        reply = body.get("reply")
        if not isinstance(reply, dict):
            raise SignatureInvalid("malformed", "a res record has no reply object")
        return reply
    for member, expected in (("msg_id", record.msg_id), ("device_id", record.device_id), ("class", record.cls)):
        if body.get(member) != expected:
            raise SignatureInvalid(
                "envelope_mismatch", f"the envelope's {member} is {expected!r}, the signed body's {body.get(member)!r}"
            )
    return body


def _referenced_thumbprint(message: dict[str, Any]) -> str | None:
    holders = signature_holders(message)
    if len(holders) != 1:
        return None  # verify_message says why (unsigned, or more than one sig)
    header, _, _ = parse_detached(holders[0][SIG])
    thumbprint = header.get(THUMBPRINT_HEADER)
    if thumbprint is not None and not isinstance(thumbprint, str):
        raise SignatureInvalid("malformed", "x5t#S256 is not a string")
    return thumbprint if "x5c" not in header else None


def _carried_certificate(
    record: UpstreamRecord, body: dict[str, Any], device_key: ec.EllipticCurvePublicKey
) -> x509.Certificate | None:
    """The delegation certificate an audit record of kind ``delegation_certificate`` carries, once checked to
    be issued by the device key: it authenticates itself, whatever key signed the record around it."""
    if record.cls != "audit" or body.get("kind") != CERTIFICATE_KIND:
        return None
    detail = body.get("detail")
    pem = detail.get("certificate_pem") if isinstance(detail, dict) else None
    if not isinstance(pem, str):
        raise SignatureInvalid("malformed", "a delegation_certificate record without detail.certificate_pem")
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except ValueError as exc:
        raise SignatureInvalid("certificate_invalid", f"not a PEM certificate: {exc}") from None
    check_issued_by_device(certificate, device_key)
    check_certificate_at(certificate, at=certificate.not_valid_before_utc, device_id=record.device_id)
    return certificate


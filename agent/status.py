"""The device's retained status and identity on its local broker, and its Last Will.

Status watchers take the retained status for the device's word, so it is always signed: at start, again
whenever the health figures are refreshed, and (when messages name the delegation certificate by thumbprint)
at each rotation, after the new certificate has been retained on the identity topic so that a verifier that
sees the status can already find it. Both are republished on every (re)connection.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.compat import UTC
from agent.errors import SigningError
from agent.mqtt import topics
from agent.mqtt.local_link import LocalLink
from agent.observe.audit import AuditEvent
from agent.signing import Signer, StrictSigner
from agent.signing.delegation import certificate_thumbprint
from agent.signing.outgoing import encode_record

log = logging.getLogger(__name__)

OFFLINE: dict[str, Any] = {"status": "offline"}


class RetainedStatus:
    """Owns the signed status, identity and will payloads; ``document`` makes a fresh status document."""

    def __init__(self, device_id: str, link: LocalLink, document: Callable[[], dict[str, Any]]) -> None:
        self.device_id = device_id
        self._link = link
        self._document = document
        self._signer: Signer | None = None
        self._payload: bytes | None = None
        self._will: bytes | None = None
        self._certificate_pem: bytes | None = None
        self._closed = threading.Event()

    @property
    def certificate_pem(self) -> bytes | None:
        """The delegation certificate retained on the identity topic (None: messages carry theirs, or none)."""
        return self._certificate_pem

    def sign_first(self, signer: Signer | None) -> None:
        """At start, before connecting: sign the status and the Last Will, and hand the will to the link."""
        self._signer = signer
        self._payload = encode_record(self._document(), signer)
        # The broker publishes the will at some later disconnect, perhaps after the delegation certificate
        # it would carry has been replaced: signed by the device key itself, it verifies with that key alone.
        will_signer = signer
        if will_signer is not None and will_signer.mode != "strict":
            will_signer = StrictSigner(will_signer.root, self.device_id)  # shares the root; closed with the signer
        self._will = encode_record(OFFLINE, will_signer)
        self._link.set_will(topics.status_topic(self.device_id), self._will)

    def refresh(self) -> None:
        """Re-sign the status with a fresh document and publish it; on a signing failure keep the previous one."""
        try:
            self._payload = encode_record(self._document(), self._signer)
        except SigningError as exc:
            log.error("could not sign the status, keeping the previous one: %s", exc)
            return
        if self._link.is_connected():
            self._link.publish_retained(topics.status_topic(self.device_id), self._payload)

    def certificate_rotated(self, certificate: x509.Certificate) -> None:
        """A new delegation certificate named by thumbprint: retain it and re-sign the status with the new key.
        Until :meth:`sign_first` has run, or once closing, only remember it."""
        self._certificate_pem = certificate.public_bytes(Encoding.PEM)
        if self._payload is None or self._closed.is_set():
            return
        self._payload = encode_record(self._document(), self._signer)
        if self._link.is_connected():
            self.publish()

    def publish(self) -> None:
        """Retain the certificate (first) and the status; the link calls this on every connection."""
        if self._certificate_pem is not None:
            self._link.publish_retained(topics.identity_topic(self.device_id), self._certificate_pem)
        assert self._payload is not None, "sign_first() runs before the link connects"
        self._link.publish_retained(topics.status_topic(self.device_id), self._payload)

    def offline_message(self) -> tuple[str, bytes] | None:
        """What to leave retained when stopping: a freshly signed offline status, else the will (None before
        start). Stops any later re-signing."""
        self._closed.set()
        offline = self._will
        try:
            offline = encode_record(OFFLINE, self._signer)
        except SigningError as exc:
            log.error("could not sign the offline status, publishing the will instead: %s", exc)
        return (topics.status_topic(self.device_id), offline) if offline is not None else None


def delegation_certificate_event(device_id: str, certificate: x509.Certificate) -> AuditEvent:
    """The audit record that carries a delegation certificate to the cloud, which needs it to verify records
    naming it by thumbprint (and holds such records until it arrives)."""
    return AuditEvent(
        kind="delegation_certificate",
        at=datetime.now(UTC),
        device_id=device_id,
        detail={
            "certificate_pem": certificate.public_bytes(Encoding.PEM).decode("ascii"),
            "x5t#S256": certificate_thumbprint(certificate.public_bytes(Encoding.DER)),
            "not_after": certificate.not_valid_after_utc.isoformat(),
        },
    )

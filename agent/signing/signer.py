"""Signers: turn canonical message bytes into a detached ES256 JWS, in one of two modes.

``strict``: the root key (the TPM) signs every message. ``delegated``: the root key certifies a fresh
in-memory key at start and every ``rotate_minutes``, and that key signs the messages, so the TPM is used
once per rotation instead of once per message. Certificates are valid for two rotation periods, so the
previous one still covers messages signed just before a rotation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.compat import UTC
from agent.config import Signing
from agent.errors import SigningError
from agent.faults import INTERNAL_ERRORS
from agent.signing.delegation import Delegation, issue_delegation
from agent.signing.identity import open_root_key
from agent.signing.jws import header_hash, jwk_thumbprint, protected_header, sign_detached, sign_detached_after
from agent.signing.roots import RootKey

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
# After a failed rotation, try again this often (or every tenth of a period, if that is shorter).
ROTATION_RETRY_S = 60.0


class Signer(Protocol):
    """What the agent needs from a signer."""

    @property
    def device_id(self) -> str:
        """The device this signer speaks for (in each reply's binding and each certificate)."""
        ...

    @property
    def mode(self) -> Literal["strict", "delegated"]:
        """Whether the root key signs each message (strict) or certifies a rotating key (delegated)."""
        ...

    @property
    def root(self) -> RootKey:
        """The device root key (``root.operations`` counts TPM operations)."""
        ...

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The device (root) public key: the one key a verifier needs."""
        ...

    def now(self) -> int:
        """The signer's clock in whole seconds, the ``iat`` it stamps when none is given."""
        ...

    def sign(self, payload: bytes, *, iat: int | None = None) -> str:
        """A detached compact JWS over ``payload`` whose protected header carries ``iat``."""
        ...

    def close(self) -> None:
        """Stop background work and release the root key; idempotent."""
        ...


class StrictSigner:
    """Every message signed by the root key itself."""

    mode: Literal["strict"] = "strict"

    def __init__(self, root: RootKey, device_id: str, *, clock: Clock = time.time) -> None:
        self.root = root
        self.device_id = device_id
        self._clock = clock
        self._kid = jwk_thumbprint(root.public_key)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.root.public_key

    def now(self) -> int:
        return int(self._clock())

    def sign(self, payload: bytes, *, iat: int | None = None) -> str:
        header = {"kid": self._kid, "iat": self.now() if iat is None else iat}
        return sign_detached(header, payload, self.root.sign_digest)

    def close(self) -> None:
        self.root.close()


class DelegatedSigner:
    """Messages signed by an in-memory key that the root key certifies and rotates in the background."""

    mode: Literal["delegated"] = "delegated"

    def __init__(
        self,
        root: RootKey,
        device_id: str,
        *,
        rotate_minutes: float,
        certificate_header: Literal["x5c", "x5t#S256"] = "x5c",
        clock: Clock = time.time,
        on_rotate: Callable[[x509.Certificate], None] | None = None,
    ) -> None:
        self.root = root
        self.device_id = device_id
        self.rotate_s = rotate_minutes * 60.0
        self.certificate_header = certificate_header
        self._clock = clock
        self._on_rotate = on_rotate
        self._rotate_lock = threading.Lock()
        self._stop = threading.Event()
        self._delegation = self._issue()
        self._header: tuple[Delegation | None, int, str, Any] = (None, 0, "", None)
        self._notify(self._delegation)
        self._rotator = threading.Thread(target=self._rotate_periodically, name="signing-rotation", daemon=True)
        self._rotator.start()

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.root.public_key

    @property
    def certificate(self) -> x509.Certificate:
        """The current delegation certificate (publish it retained when using ``x5t#S256``)."""
        return self._delegation.certificate

    def now(self) -> int:
        return int(self._clock())

    def sign(self, payload: bytes, *, iat: int | None = None) -> str:
        iat = self.now() if iat is None else iat
        delegation = self._delegation
        if not delegation.valid_at(iat):
            # The background rotation failed for a whole period, or the clock jumped (a device without an
            # RTC setting its time from NTP after boot): certify a key for now before signing anything.
            delegation = self._rotate_if_invalid_at(iat)
        cached = self._header
        if cached[0] is delegation and cached[1] == iat:
            encoded_header, hashed_header = cached[2], cached[3]
        else:
            # Every message signed in the same second with the same key shares its header (1.3 KB with
            # x5c): encoding it once per second saves a third of a small reply's signing cost.
            header: dict[str, object] = {"kid": delegation.kid, "iat": iat}
            if self.certificate_header == "x5c":
                header["x5c"] = delegation.x5c
            else:
                header["x5t#S256"] = delegation.x5t_s256
            encoded_header = protected_header(header)
            hashed_header = header_hash(encoded_header)
            self._header = (delegation, iat, encoded_header, hashed_header)
        return sign_detached_after(encoded_header, hashed_header, payload, delegation.sign_digest)

    def rotate(self) -> x509.Certificate:
        """Certify a fresh key now (one root-key operation); returns its certificate."""
        with self._rotate_lock:
            self._delegation = self._issue()
        self._notify(self._delegation)
        return self._delegation.certificate

    def close(self) -> None:
        self._stop.set()
        if self._rotator is not threading.current_thread():
            self._rotator.join(timeout=5.0)
        self.root.close()

    def _issue(self) -> Delegation:
        now = datetime.fromtimestamp(self._clock(), UTC)
        return issue_delegation(self.root, self.device_id, now=now, lifetime=timedelta(seconds=2 * self.rotate_s))

    def _rotate_if_invalid_at(self, iat: int) -> Delegation:
        with self._rotate_lock:
            if not self._delegation.valid_at(iat):
                self._delegation = self._issue()
                rotated = True
            else:
                rotated = False
            delegation = self._delegation
        if rotated:
            self._notify(delegation)
        if not delegation.valid_at(iat):
            raise SigningError(f"iat {iat} is outside the validity of a certificate issued just now")
        return delegation

    def _rotate_periodically(self) -> None:
        wait = self.rotate_s
        while not self._stop.wait(wait):
            try:
                self.rotate()
                wait = self.rotate_s
            except SigningError as exc:
                wait = min(ROTATION_RETRY_S, self.rotate_s / 10)
                logger.error("rotating the delegated signing key failed (retrying in %.0f s): %s", wait, exc)
            except Exception as exc:  # e.g. from on_rotate: a bug must not stop rotation, and shows in /metrics
                wait = min(ROTATION_RETRY_S, self.rotate_s / 10)
                INTERNAL_ERRORS.record("signing_rotation", exc)

    def _notify(self, delegation: Delegation) -> None:
        logger.info(
            "delegated signing key %s certified until %s",
            delegation.kid,
            delegation.certificate.not_valid_after_utc.isoformat(),
        )
        if self._on_rotate is not None:
            self._on_rotate(delegation.certificate)


def create_signer(
    settings: Signing,
    device_id: str,
    data_dir: Path,
    *,
    tpm_delay_s: float = 0.0,
    clock: Clock = time.time,
    on_rotate: Callable[[x509.Certificate], None] | None = None,
) -> Signer | None:
    """The signer ``settings`` describe, ready to sign; None for ``backend = "none"``.

    Raises :class:`SigningError` if the key is unusable (TPM absent, hung, in lockout, wrong key at the
    handle, key file readable by others): the agent must then exit, never fall back to another backend.
    ``tpm_delay_s`` adds latency to every TPM operation (tests and benchmarks model a slow chip with it).
    """
    if settings.backend == "none":
        return None
    root = open_root_key(settings, data_dir, tpm_delay_s=tpm_delay_s)
    try:
        if settings.mode == "strict":
            return StrictSigner(root, device_id, clock=clock)
        return DelegatedSigner(
            root,
            device_id,
            rotate_minutes=settings.rotate_minutes,
            certificate_header=settings.certificate_header,
            clock=clock,
            on_rotate=on_rotate,
        )
    except BaseException:
        root.close()
        raise

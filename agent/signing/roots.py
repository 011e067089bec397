"""The device's root key: the one key that identifies the device, behind a small interface.

Two implementations: :class:`~agent.signing.tpm.TpmRootKey` (the key lives in the TPM) and
:class:`SoftwareRootKey` (a P-256 key in a PEM file, for development only).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Literal, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import SigningError
from agent.signing.jws import ES256_PREHASHED, raw_from_der

logger = logging.getLogger(__name__)


class RootKey(Protocol):
    """A P-256 key that signs SHA-256 digests and never shows its private half."""

    @property
    def backend(self) -> Literal["tpm", "software"]:
        """Where the key lives."""
        ...

    @property
    def created(self) -> bool:
        """Whether opening the key created it."""
        ...

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The root's public key: what verifiers and the fleet CA trust."""
        ...

    @property
    def operations(self) -> int:
        """How many operations the key has performed (for the TPM: calls into the TPM)."""
        ...

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a SHA-256 digest; return the raw 64-byte R || S signature."""
        ...

    def close(self) -> None:
        """Release the key (TPM context, threads); idempotent."""
        ...


def public_key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo, as ``openssl pkey -pubin -outform DER | sha256sum``."""
    return hashlib.sha256(public_key_der(public_key)).hexdigest()


def public_key_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_pem(public_key: ec.EllipticCurvePublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(
        "ascii"
    )


def load_public_key(data: bytes | str | ec.EllipticCurvePublicKey) -> ec.EllipticCurvePublicKey:
    """Load a P-256 public key given as PEM or DER (SubjectPublicKeyInfo), or pass one through."""
    if isinstance(data, ec.EllipticCurvePublicKey):
        key = data
    else:
        raw = data.encode("ascii") if isinstance(data, str) else data
        try:
            loaded = (
                serialization.load_pem_public_key(raw)
                if raw.lstrip().startswith(b"-----")
                else serialization.load_der_public_key(raw)
            )
        except ValueError as exc:
            raise SigningError(f"not a public key: {exc}") from None
        if not isinstance(loaded, ec.EllipticCurvePublicKey):
            raise SigningError("the device public key is not an EC key")
        key = loaded
    if not isinstance(key.curve, ec.SECP256R1):
        raise SigningError(f"the device public key is on {key.curve.name}, not P-256")
    return key


class SoftwareRootKey:
    """A P-256 key in a PEM file: no hardware protection, so development and demos only."""

    backend: Literal["software"] = "software"

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, path: Path, *, created: bool) -> None:
        self._private_key = private_key
        self.path = path
        self.created = created
        self._operations = 0
        self._count_lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, create: bool) -> SoftwareRootKey:
        """Load the key file, creating it (mode 0600) if missing and ``create`` is set.

        Refuses a key file that group or others can read or write: the key is the device's identity.
        """
        logger.warning(
            "SIGNING WITH A SOFTWARE KEY (%s): the device key is a plain file, not protected by a TPM. "
            'For development only; set [signing] backend = "tpm" on a real device.',
            path,
        )
        created = False
        if not path.exists():
            if not create:
                raise SigningError(f"no device key file at {path}: run `edge-agent identity init` first")
            _write_new_key(path)
            created = True
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SigningError(
                f"key file {path} has mode {stat.S_IMODE(mode):04o}: group/others may read it; chmod 600 {path}"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise SigningError(f"cannot load key file {path}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise SigningError(f"key file {path} does not hold a P-256 private key")
        return cls(key, path, created=created)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._private_key.public_key()

    @property
    def operations(self) -> int:
        return self._operations

    def sign_digest(self, digest: bytes) -> bytes:
        with self._count_lock:
            self._operations += 1
        return raw_from_der(self._private_key.sign(digest, ES256_PREHASHED))

    def close(self) -> None:
        """Nothing to release: the key is only in memory."""


def _write_new_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        # O_EXCL: never overwrite a key another process created in the meantime.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise SigningError(f"cannot create key file {path}: {exc}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    logger.warning("created a new software device key at %s", path)

"""Who may deploy to this device: release keys, the root-signed key list, and the clock expiry is checked on.

Every deployment document, bundle manifest and key list is a :class:`~agent.deploy.documents.SignedEnvelope`:
a JSON payload and a detached ES256 compact JWS over its JCS bytes (:mod:`agent.signing.jws`,
:mod:`agent.signing.canonical`; no second JOSE implementation). The protected header names the key by
``kid`` (its RFC 7638 thumbprint) and the document kind by ``typ``, so a manifest can never pass as a
deployment document or a key list.

Keys. ``[deploy] trusted_keys`` are the release keys provisioned with the device. ``[deploy] root_key`` signs
key lists (TUF-style: ``version``, ``expires``, ``keys``, ``revoked``): a newer, unexpired list signed by the
root adds release keys and revokes others (provisioned ones included) without reprovisioning. The root key
itself never signs deployments.

Clock. A Raspberry Pi has no real-time clock: until the wall clock is known good, synchronised (the kernel's
NTP state, as chrony, ntpd or systemd-timesyncd leave it) or later than the last signed time the device has
seen (persisted), expiry is checked against that last-seen time instead (an expired document stays refused
after a reboot that set the clock back); the refusal says so.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key
from pydantic import BaseModel, Field, ValidationError

from agent.deploy.documents import BundleManifest, DeploymentDocument, Frozen, SignedEnvelope
from agent.errors import DeployError, SignatureInvalid, SigningError
from agent.signing.canonical import canonical_bytes, normalise, parse_json
from agent.signing.jws import ES256_PREHASHED, jwk_thumbprint, parse_detached, raw_from_der, sign_detached
from agent.signing.jws import verify_detached

log = logging.getLogger(__name__)

Kind = Literal["bundle", "deployment", "keylist"]
TYP: dict[Kind, str] = {
    "bundle": "edge-agent-bundle+jws",
    "deployment": "edge-agent-deployment+jws",
    "keylist": "edge-agent-keylist+jws",
}
M = TypeVar("M", bound=BaseModel)


class KeyList(Frozen):
    """Release keys the root key vouches for, replacing any older list."""

    type: Literal["keylist"] = "keylist"
    version: int = Field(ge=1)
    keys: tuple[str, ...] = Field(default=(), description="PEM SubjectPublicKeyInfo of P-256 release keys")
    revoked: tuple[str, ...] = Field(default=(), description="kids (JWK thumbprints) no longer trusted")
    issued_at: float = Field(ge=0)
    expires: float = Field(ge=0)


class TrustStore(Protocol):
    """Where trust state persists (the deployment journal): small named values."""

    def get_value(self, name: str) -> str | None: ...

    def put_value(self, name: str, value: str) -> None: ...


def load_public_key(text_or_path: str | Path) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from PEM text or from a PEM file's path."""
    text = str(text_or_path)
    try:
        pem = text.encode() if text.lstrip().startswith("-----BEGIN") else Path(text).read_bytes()
        key = load_pem_public_key(pem)
    except (OSError, ValueError) as exc:
        raise DeployError(f"unusable deployment key {text[:60]!r}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise DeployError("deployment keys are P-256 (ES256) keys")
    return key


def public_pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def sign_document(payload: dict[str, Any], private_key: ec.EllipticCurvePrivateKey, kind: Kind) -> SignedEnvelope:
    """Sign ``payload`` as a document of ``kind`` (the operator's side; tests and benchmarks use it too)."""
    body = normalise(payload)
    assert isinstance(body, dict)
    header = {"kid": jwk_thumbprint(private_key.public_key()), "typ": TYP[kind]}
    token = sign_detached(
        header, canonical_bytes(body), lambda digest: raw_from_der(private_key.sign(digest, ES256_PREHASHED))
    )
    return SignedEnvelope(payload=body, signature=token)


_TIME_ERROR = 5  # adjtimex's answer while the kernel clock is not synchronised (STA_UNSYNC)
_TIMEX_BYTES = 512  # room for struct timex on every ABI; zeroed, so ``modes`` is 0: read only, no privilege


def kernel_clock_synchronised() -> bool:
    """Whether the kernel says its clock is synchronised (an NTP daemon keeps it so); False where unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.adjtimex(ctypes.create_string_buffer(_TIMEX_BYTES))) not in (-1, _TIME_ERROR)
    except (OSError, AttributeError):
        return False


class SignedClock:
    """The wall clock, checked against the latest signed time seen (persisted in ``store``) unless the kernel
    says it is synchronised."""

    _KEY = "trust.last_signed_time"

    def __init__(
        self,
        store: TrustStore,
        wall: Callable[[], float] = time.time,
        synchronised: Callable[[], bool] = kernel_clock_synchronised,
    ) -> None:
        self._store = store
        self._wall = wall
        self._synchronised = synchronised
        self._lock = threading.Lock()
        stored = store.get_value(self._KEY)
        self.last_seen = float(stored) if stored is not None else 0.0

    def now(self) -> tuple[float, str | None]:
        """The time to check expiry against, and why it is not the wall clock (None when it is)."""
        wall = self._wall()
        if wall >= self.last_seen or self._synchronised():
            return wall, None
        return self.last_seen, (
            f"the clock ({wall:.0f}) is not synchronised and is behind the last signed time seen "
            f"({self.last_seen:.0f}); expiry checked against that"
        )

    def observe(self, signed_time: float) -> None:
        """Remember a verified signed time if it is the latest seen."""
        with self._lock:
            if signed_time > self.last_seen:
                self.last_seen = signed_time
                self._store.put_value(self._KEY, repr(signed_time))


class Trust:
    """Verifies signed documents against the provisioned release keys and the current key list."""

    _KEY_LIST = "trust.key_list"

    def __init__(
        self,
        release_keys: list[ec.EllipticCurvePublicKey],
        root_key: ec.EllipticCurvePublicKey | None,
        store: TrustStore,
        clock: SignedClock | None = None,
    ) -> None:
        self._provisioned = {jwk_thumbprint(key): key for key in release_keys}
        self._root = root_key
        self._store = store
        self.clock = clock or SignedClock(store)
        self.key_list: KeyList | None = None
        stored = store.get_value(self._KEY_LIST)
        if stored is not None:
            self.key_list = KeyList.model_validate_json(stored)

    def release_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        """kid -> key of every release key trusted now: provisioned plus listed, less revoked."""
        keys = dict(self._provisioned)
        if self.key_list is not None:
            for pem in self.key_list.keys:
                key = load_public_key(pem)
                keys[jwk_thumbprint(key)] = key
            for kid in self.key_list.revoked:
                keys.pop(kid, None)
        return keys

    def verify_deployment(self, raw: bytes) -> DeploymentDocument:
        """Parse and verify a deployment document and the bundle manifest it carries; refuse expired ones."""
        envelope = _envelope(raw)
        document = self._verified(envelope, "deployment", DeploymentDocument, self.release_keys())
        self._check_expiry("deployment document", document.expires)
        if document.bundle is not None:
            self.verify_manifest(document.bundle)
        self.clock.observe(document.issued_at)
        return document

    def verify_manifest(self, envelope: SignedEnvelope) -> BundleManifest:
        """Verify a bundle manifest's signature (a release key) and expiry."""
        manifest = self._verified(envelope, "bundle", BundleManifest, self.release_keys())
        self._check_expiry(f"bundle {manifest.bundle_id}", manifest.expires)
        self.clock.observe(manifest.issued_at)
        return manifest

    def accept_key_list(self, raw: bytes) -> KeyList:
        """Verify a key list with the root key and adopt it if newer than the one held; returns the list in force."""
        if self._root is None:
            raise DeployError("key list refused: no [deploy] root_key is configured")
        key_list = self._verified(_envelope(raw), "keylist", KeyList, {jwk_thumbprint(self._root): self._root})
        if self.key_list is not None and key_list.version <= self.key_list.version:
            if key_list.version < self.key_list.version:
                raise DeployError(f"key list version {key_list.version} is older than {self.key_list.version}")
            return self.key_list
        self._check_expiry(f"key list version {key_list.version}", key_list.expires)
        self._store.put_value(self._KEY_LIST, key_list.model_dump_json())
        self.key_list = key_list
        self.clock.observe(key_list.issued_at)
        log.info("deploy: key list version %d adopted (%d keys, %d revoked)", key_list.version,
                 len(key_list.keys), len(key_list.revoked))  # fmt: skip
        return key_list

    def _check_expiry(self, what: str, expires: float) -> None:
        now, note = self.clock.now()
        if expires <= now:
            raise DeployError(f"{what} expired at {expires:.0f}" + (f" ({note})" if note else ""))
        if note:
            log.warning("deploy: %s", note)

    @staticmethod
    def _verified(
        envelope: SignedEnvelope, kind: Kind, model: type[M], keys: dict[str, ec.EllipticCurvePublicKey]
    ) -> M:
        try:
            header, _, _ = parse_detached(envelope.signature)
            if header.get("typ") != TYP[kind]:
                raise DeployError(f"{kind} refused: signed as {header.get('typ')!r}, not {TYP[kind]!r}")
            key = keys.get(str(header.get("kid")))
            if key is None:
                raise DeployError(f"{kind} refused: signed by key {header.get('kid')!r}, which is not trusted")
            verify_detached(envelope.signature, canonical_bytes(normalise(envelope.payload)), key)
        except SignatureInvalid as exc:
            raise DeployError(f"{kind} refused: {exc}") from None
        except SigningError as exc:
            raise DeployError(f"{kind} refused: payload has no canonical form: {exc}") from None
        try:
            return model.model_validate(envelope.payload)
        except ValidationError as exc:
            raise DeployError(f"{kind} refused: {_first_error(exc)}") from None


def _envelope(raw: bytes) -> SignedEnvelope:
    try:
        return SignedEnvelope.model_validate(parse_json(raw))
    except (SigningError, ValidationError) as exc:
        raise DeployError(f"not a signed document: {str(exc).splitlines()[0]}") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"


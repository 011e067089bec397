"""X.509 issued by the device root key: short-lived delegation certificates and the CSR for the fleet CA.

A delegation certificate binds an in-memory P-256 key to the device for a short window so messages can be
signed without a TPM round trip each. Its issuer is the device key (issuer name ``CN=<device id>``, the
subject the CSR asks the fleet CA for), so ``fleet CA -> device certificate -> delegation certificate`` is an
ordinary X.509 chain. The TBS part is built by ``cryptography`` and signed by the root key (see :mod:`der`).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from agent.errors import SignatureInvalid, SigningError
from agent.signing import der
from agent.signing.jws import ES256_PREHASHED, b64url_encode, der_from_raw, jwk_thumbprint, raw_from_der
from agent.signing.roots import RootKey, public_key_der

# Verifiers and X.509 tools compare validity against their own clocks; a little backdating absorbs skew.
BACKDATE = timedelta(minutes=1)
DELEGATED_UNIT = "edge-agent delegated signing key"


@dataclass(frozen=True)
class Delegation:
    """An in-memory signing key and the certificate the device key issued for it."""

    private_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    certificate_der: bytes = field(repr=False)
    kid: str
    x5t_s256: str
    not_before: float
    not_after: float

    def valid_at(self, timestamp: float) -> bool:
        """Whether the certificate covers a message stamped with ``iat = timestamp`` (POSIX seconds)."""
        return self.not_before <= timestamp <= self.not_after

    def sign_digest(self, digest: bytes) -> bytes:
        """Raw R || S ECDSA signature over a SHA-256 digest, with the delegated key."""
        return raw_from_der(self.private_key.sign(digest, ES256_PREHASHED))

    @property
    def x5c(self) -> list[str]:
        """The JWS ``x5c`` value: standard (not url-safe) base64 DER, per RFC 7515 section 4.1.6."""
        return [base64.b64encode(self.certificate_der).decode("ascii")]


def device_name(device_id: str) -> x509.Name:
    """The X.509 name of the device key: subject of its CSR, issuer of its delegation certificates."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])


def certificate_thumbprint(certificate_der: bytes) -> str:
    """The JWS ``x5t#S256`` value of a DER certificate."""
    return b64url_encode(hashlib.sha256(certificate_der).digest())


def issue_delegation(root: RootKey, device_id: str, *, now: datetime, lifetime: timedelta) -> Delegation:
    """Generate a P-256 key and have ``root`` certify it for ``[now - 1 min, now + lifetime]``.

    Costs exactly one root-key signature.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, DELEGATED_UNIT),
                    x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                ]
            )
        )
        .issuer_name(device_name(device_id))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.public_key), critical=False)
    )
    # The TBS bytes do not depend on the signing key, only on its algorithm: sign with the new key to get
    # them, then replace the signature with the root's.
    tbs = builder.sign(key, hashes.SHA256()).tbs_certificate_bytes
    certificate_der = der.signed_structure(tbs, der_from_raw(root.sign_digest(hashlib.sha256(tbs).digest())))
    certificate = x509.load_der_x509_certificate(certificate_der)
    _require_issued_by(certificate, root.public_key)
    return Delegation(
        private_key=key,
        certificate=certificate,
        certificate_der=certificate_der,
        kid=jwk_thumbprint(public_key),
        x5t_s256=certificate_thumbprint(certificate_der),
        not_before=certificate.not_valid_before_utc.timestamp(),
        not_after=certificate.not_valid_after_utc.timestamp(),
    )


def build_csr(root: RootKey, device_id: str) -> x509.CertificateSigningRequest:
    """A CSR for the fleet CA, for the root key, subject ``CN=<device id>``, signed by the root key.

    It requests ``CA:TRUE, pathlen:0`` and keyCertSign, because the device key issues its delegation
    certificates; a fleet CA that grants them makes those verifiable with any X.509 path validator.
    """
    throwaway = ec.generate_private_key(ec.SECP256R1())
    template = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(device_name(device_id))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(digital_signature=True, key_cert_sign=True), critical=True)
        .sign(throwaway, hashes.SHA256())
    )
    # CertificationRequestInfo = SEQUENCE { version, subject, subjectPKInfo, attributes }: swap in the root key.
    version, subject, _, attributes = der.children(template.tbs_certrequest_bytes)
    info = der.encode_tlv(der.SEQUENCE, version + subject + public_key_der(root.public_key) + attributes)
    signature = der_from_raw(root.sign_digest(hashlib.sha256(info).digest()))
    csr = x509.load_der_x509_csr(der.signed_structure(info, signature))
    if not csr.is_signature_valid:
        raise SigningError("the CSR signed by the device key does not verify")
    return csr


def check_delegation_certificate(
    certificate: x509.Certificate,
    device_public_key: ec.EllipticCurvePublicKey,
    *,
    at: datetime,
    device_id: str | None = None,
) -> None:
    """Check a delegation certificate against the device key; raise :class:`SignatureInvalid` with a reason.

    Issued by ``device_public_key`` (else ``foreign_certificate``), an end-entity signing certificate for a
    P-256 key (else ``certificate_invalid``), valid at ``at`` (else ``certificate_expired``) and, if
    ``device_id`` is given, for that device (else ``device_mismatch``).
    """
    check_issued_by_device(certificate, device_public_key)
    check_certificate_at(certificate, at=at, device_id=device_id)


def check_issued_by_device(certificate: x509.Certificate, device_public_key: ec.EllipticCurvePublicKey) -> None:
    """What does not depend on the message: issued by the device key, an end-entity P-256 signing certificate."""
    try:
        _require_issued_by(certificate, device_public_key)
    except SigningError:
        raise SignatureInvalid(
            "foreign_certificate", "the delegation certificate was not issued by this device's key"
        ) from None
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        raise SignatureInvalid("certificate_invalid", "the delegation certificate is not for a P-256 key")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise SignatureInvalid(
            "certificate_invalid", "the delegation certificate lacks basicConstraints or keyUsage"
        ) from None
    if constraints.ca or not usage.digital_signature:
        raise SignatureInvalid("certificate_invalid", "the delegation certificate is not an end-entity signing cert")


def check_certificate_at(certificate: x509.Certificate, *, at: datetime, device_id: str | None = None) -> None:
    """What depends on the message: the certificate valid at its signing time, and for the device it names."""
    if not certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc:
        raise SignatureInvalid(
            "certificate_expired",
            f"the message was signed at {at.isoformat()}, outside the delegation certificate's validity "
            f"{certificate.not_valid_before_utc.isoformat()} .. {certificate.not_valid_after_utc.isoformat()}",
        )
    if device_id is not None and certificate_device_id(certificate) != device_id:
        raise SignatureInvalid(
            "device_mismatch",
            f"the delegation certificate is for {certificate_device_id(certificate)!r}, not {device_id!r}",
        )


def certificate_device_id(certificate: x509.Certificate) -> str | None:
    """The subject CN of a delegation certificate: the device id."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _require_issued_by(certificate: x509.Certificate, issuer_key: ec.EllipticCurvePublicKey) -> None:
    if certificate.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        raise SigningError("the certificate is not signed with ECDSA SHA-256")
    try:
        issuer_key.verify(certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SigningError("the certificate's signature does not verify with the issuer key") from None


def key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    """A KeyUsage extension with only the named bits set (device, delegation and fleet CA certificates)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )

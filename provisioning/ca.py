"""X.509 for the fleet: P-256 keys, the two CAs, the certificates they issue, and revocation lists.

The fleet keeps two CAs because the device identity certificate is itself a CA (the device key issues its
short-lived delegation certificates, see agent/signing/delegation.py). If brokers trusted the identity CA,
any device key could mint a TLS client certificate with any common name, i.e. any broker username. So
brokers trust only the broker CA, which issues nothing but TLS leaf certificates.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.compat import UTC
from agent.errors import ProvisioningError
from agent.signing.delegation import key_usage

# Tools compare validity against their own clocks; a little backdating absorbs skew between machines.
BACKDATE = timedelta(minutes=5)
LeafKind = Literal["device", "server", "client"]


def new_key() -> ec.EllipticCurvePrivateKey:
    """A new P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM: mosquitto and paho read key files without a passphrase."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def public_key_sha256(public_key: CertificatePublicKeyTypes) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo, the fingerprint ``edge-agent identity`` prints."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisioningError(f"{path}: not an EC private key")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def build_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A PEM CSR for a file key; the CA sets every extension itself, so the request carries only the name."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


class CertificateRequest(NamedTuple):
    """What the CA takes from a CSR: the name asked for and the key, whose possession the CSR proved."""

    common_name: str | None
    public_key: ec.EllipticCurvePublicKey


def load_csr(pem: str | bytes, what: str) -> CertificateRequest:
    """Parse a PEM CSR and check that it is self-signed by a P-256 key; ``what`` names it in errors."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii") if isinstance(pem, str) else pem)
        public_key = csr.public_key()
        signature_ok = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ProvisioningError(f"{what}: not a usable PEM certificate request ({exc})") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise ProvisioningError(f"{what}: the key must be EC P-256")
    if not signature_ok:
        raise ProvisioningError(f"{what}: the request's signature does not verify")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertificateRequest(str(names[0].value) if names else None, public_key)


def certificate_matches(path: Path, serial: str, key_sha256: str, dns_names: Sequence[str]) -> bool:
    """Whether ``path`` holds the certificate with this hex serial, for this key and exactly these names."""
    try:
        certificate = load_certificate(path)
    except (OSError, ValueError):
        return False
    if f"{certificate.serial_number:x}" != serial or public_key_sha256(certificate.public_key()) != key_sha256:
        return False
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return not dns_names
    return [str(name.value) for name in names] == list(dict.fromkeys(dns_names))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(common_name: str, *, path_length: int, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA key and certificate."""
    key = new_key()
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_certificate: x509.Certificate,
    *,
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    kind: LeafKind,
    days: int,
    dns_names: Iterable[str] = (),
) -> x509.Certificate:
    """Certify ``public_key`` as ``CN=common_name``; the extensions are the CA's choice, never the CSR's.

    ``device``: the device identity, a CA limited to leaf delegation certificates (``pathlen:0``).
    ``server``: a broker's TLS certificate for ``dns_names`` (IP addresses are recognised).
    ``client``: a TLS client certificate; brokers take the common name as the username.
    """
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + timedelta(days=days), ca_certificate.not_valid_after_utc))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if kind == "device":
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        builder = builder.add_extension(key_usage(digital_signature=True, key_cert_sign=True), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(key_usage(digital_signature=True), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    names = [_general_name(name) for name in dict.fromkeys(dns_names)]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def build_crl(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_certificate: x509.Certificate,
    revoked: Iterable[tuple[int, datetime, bool]],
    *,
    number: int,
    days: int,
) -> x509.CertificateRevocationList:
    """A CRL of ``(serial, revocation time, superseded)`` entries, valid for ``days``.

    OpenSSL (mosquitto's ``crlfile``) refuses every client once a CRL is past its next update, so the
    operator must re-issue it (``fleet crl``) within that time.
    """
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_certificate.subject)
        .last_update(now - BACKDATE)
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    for serial, revoked_at, superseded in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at)
        if superseded:  # RFC 5280 5.3.1: other revocations carry no reason rather than "unspecified"
            entry = entry.add_extension(x509.CRLReason(x509.ReasonFlags.superseded), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca_key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)

"""Just enough DER to sign X.509 structures with a key ``cryptography`` cannot hold (one inside a TPM).

``cryptography`` builds the to-be-signed part (TBSCertificate, CertificationRequestInfo) with a throwaway
key; the real key signs those bytes and :func:`signed_structure` wraps them exactly as X.509 requires:
``SEQUENCE { tbs, AlgorithmIdentifier ecdsa-with-SHA256, BIT STRING signature }``.
"""

from __future__ import annotations

from agent.errors import SigningError

SEQUENCE = 0x30
BIT_STRING = 0x03
# AlgorithmIdentifier { ecdsa-with-SHA256 (1.2.840.10045.4.3.2) }, parameters absent (RFC 5758 section 3.2).
ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")


def encode_tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag, definite length, content."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def read_tlv(data: bytes, offset: int = 0) -> tuple[int, int, int]:
    """Return (tag, content start, element end) of the DER element at ``offset``."""
    try:
        tag, first = data[offset], data[offset + 1]
        start = offset + 2
        if first < 0x80:
            size = first
        else:
            count = first & 0x7F
            size = int.from_bytes(data[start : start + count], "big")
            start += count
    except IndexError:
        raise SigningError("truncated DER") from None
    if start + size > len(data):
        raise SigningError("truncated DER")
    return tag, start, start + size


def children(element: bytes) -> list[bytes]:
    """The encoded child elements of a constructed DER element (e.g. a SEQUENCE)."""
    _, start, end = read_tlv(element)
    parts = []
    while start < end:
        _, _, child_end = read_tlv(element, start)
        parts.append(element[start:child_end])
        start = child_end
    return parts


def signed_structure(tbs: bytes, der_signature: bytes) -> bytes:
    """A Certificate or CertificationRequest: the TBS bytes signed with ECDSA P-256 SHA-256."""
    return encode_tlv(SEQUENCE, tbs + ECDSA_WITH_SHA256 + encode_tlv(BIT_STRING, b"\x00" + der_signature))

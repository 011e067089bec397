"""Signatures on every message the agent publishes, rooted in the device key (TPM or, for development, a file).

The public API, re-exported here; the TPM backend (and tpm2-pytss) is imported only when configured.
See docs/signing.md for the format and how to verify it.
"""

from agent.signing.canonical import canonical_bytes, encode_message, normalise, parse_json
from agent.signing.identity import IdentityInfo, init_identity, show_identity
from agent.signing.message import ReplyBinding, encode_signed_reply, request_sha256, sign_record, sign_reply
from agent.signing.roots import load_public_key, public_key_fingerprint, public_key_pem
from agent.signing.signer import DelegatedSigner, Signer, StrictSigner, create_signer
from agent.signing.verify import VerifiedMessage, verify_message

__all__ = [
    "DelegatedSigner",
    "IdentityInfo",
    "ReplyBinding",
    "Signer",
    "StrictSigner",
    "VerifiedMessage",
    "canonical_bytes",
    "create_signer",
    "encode_message",
    "encode_signed_reply",
    "init_identity",
    "load_public_key",
    "normalise",
    "parse_json",
    "public_key_fingerprint",
    "public_key_pem",
    "request_sha256",
    "show_identity",
    "sign_record",
    "sign_reply",
    "verify_message",
]

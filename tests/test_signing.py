"""Signing against a real swtpm (and the software key), checked by an independent verifier written here.

The independent verifier uses only ``cryptography``, ``json``, ``base64`` and the RFC 8785 reference
canonicaliser: it shares no code with agent.signing, so a bug in the signer cannot hide itself.
tpm2-tools stand in for an operator (or attacker) who touches the TPM behind the agent's back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.compat import UTC
from agent.config import Signing
from agent.errors import SignatureInvalid, SigningError
from agent.faults import INTERNAL_ERRORS
from agent.signing import (
    ReplyBinding,
    create_signer,
    encode_message,
    encode_signed_reply,
    init_identity,
    normalise,
    parse_json,
    public_key_pem,
    request_sha256,
    show_identity,
    sign_record,
    sign_reply,
    verify_message,
)
from agent.signing.canonical import canonical_bytes
from agent.signing.delegation import Delegation, issue_delegation
from agent.signing.jws import header_hash, protected_header, sign_detached, sign_detached_after
from agent.signing.roots import SoftwareRootKey
from agent.signing.verify import CheckedCertificates
from agent.signing.signer import DelegatedSigner, Signer
from agent.signing.swtpm import SwtpmProcess

DEVICE = "pi-kitchen-01"
HANDLE = 0x81000010
REQUEST = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"classify"}}'
OTHER_REQUEST = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"detect"}}'
needs_tpm2_tools = pytest.mark.skipif(shutil.which("tpm2_evictcontrol") is None, reason="tpm2-tools not installed")


# ---------------------------------------------------------------- the independent verifier


def _b64url_decode(text: str) -> bytes:
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode() != text:
        raise ValueError("non-canonical base64url")
    return data


def independent_verify(raw: bytes, device_pem: str, *, request_digest: str | None = None) -> dict[str, Any]:
    """Verify a published message from first principles; raise on any failure, return the message."""
    message = json.loads(raw)
    result, error = message.get("result"), message.get("error")
    candidates = [
        message,
        result.get("_meta") if isinstance(result, dict) else None,
        error.get("data") if isinstance(error, dict) else None,
    ]
    holders = [c for c in candidates if isinstance(c, dict) and "sig" in c]
    if len(holders) != 1:
        raise ValueError(f"{len(holders)} signatures")
    holder = holders[0]
    token = holder.pop("sig")
    payload = rfc8785.dumps(message)
    encoded_header, detached, encoded_signature = token.split(".")
    if detached != "":
        raise ValueError("payload not detached")
    header = json.loads(_b64url_decode(encoded_header))
    if header["alg"] != "ES256":
        raise ValueError("alg")
    device_key = serialization.load_pem_public_key(device_pem.encode())
    key = device_key
    if "x5c" in header:
        certificate = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0], validate=True))
        device_key.verify(certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        signed_at = datetime.fromtimestamp(header["iat"], UTC)
        if not certificate.not_valid_before_utc <= signed_at <= certificate.not_valid_after_utc:
            raise ValueError("delegation certificate not valid at iat")
        if certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value != DEVICE:
            raise ValueError("certificate for another device")
        key = certificate.public_key()
    signature = _b64url_decode(encoded_signature)
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    signing_input = f"{encoded_header}.{base64.urlsafe_b64encode(payload).rstrip(b'=').decode()}".encode()
    key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
    if holder is not message:
        if holder["iat"] != header["iat"] or holder["device_id"] != DEVICE:
            raise ValueError("binding")
        if request_digest is not None and holder["request_sha256"] != request_digest:
            raise ValueError("reply to another request")
    return message


# ---------------------------------------------------------------- helpers and fixtures


def tpm_settings(tpm: SwtpmProcess, **overrides: Any) -> Signing:
    return Signing(backend="tpm", tcti=tpm.tcti, handle=HANDLE, tpm_timeout_s=5.0, **overrides)


def software_settings(tmp_path: Path, **overrides: Any) -> Signing:
    return Signing(backend="software", key_file=tmp_path / "keys" / "device.pem", **overrides)


def tpm2(
    tpm: SwtpmProcess, *args: str, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a tpm2-tools command against the swtpm, then flush what it left loaded (no resource manager)."""
    env = {**os.environ, "TPM2TOOLS_TCTI": tpm.tcti, "TSS2_LOG": "all+NONE"}
    done = subprocess.run(["tpm2_" + args[0], *args[1:]], env=env, cwd=cwd, capture_output=True, text=True)
    subprocess.run(["tpm2_flushcontext", "-t"], env=env, capture_output=True, check=True)
    if check and done.returncode != 0:
        raise AssertionError(f"tpm2_{args[0]} failed: {done.stderr}")
    return done


def transient_handles(tpm: SwtpmProcess) -> str:
    env = {**os.environ, "TPM2TOOLS_TCTI": tpm.tcti, "TSS2_LOG": "all+NONE"}
    return subprocess.run(
        ["tpm2_getcap", "handles-transient"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def tpm_signer(swtpm: SwtpmProcess, data_dir: Path) -> Iterator[Signer]:
    signer = create_signer(tpm_settings(swtpm), DEVICE, data_dir)
    assert signer is not None
    yield signer
    signer.close()


def signed_reply(signer: Signer, request: bytes = REQUEST, **result: Any) -> bytes:
    reply = {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "cat"}], **result}}
    return encode_message(sign_reply(reply, signer, ReplyBinding.for_request("client-a", 7, request)))


def forged_reply(delegation: Delegation, iat: int) -> bytes:
    """A reply signed with ``delegation``'s key as the agent would, but at a chosen ``iat``."""
    message = {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {
            "_meta": {
                "device_id": DEVICE,
                "client_id": "client-a",
                "request_id": 7,
                "request_sha256": request_sha256(REQUEST),
                "iat": iat,
            }
        },
    }
    header = {"kid": delegation.kid, "iat": iat, "x5c": delegation.x5c}
    message["result"]["_meta"]["sig"] = sign_detached(header, canonical_bytes(message), delegation.sign_digest)
    return encode_message(message)


def reason_of(call: Callable[[], Any]) -> str:
    with pytest.raises(SignatureInvalid) as caught:
        call()
    return caught.value.reason


# ---------------------------------------------------------------- the TPM key


@needs_tpm2_tools
def test_tpm_key_is_created_persisted_and_reused_after_a_tpm_restart(
    swtpm: SwtpmProcess, data_dir: Path, tmp_path: Path
) -> None:
    first = create_signer(tpm_settings(swtpm), DEVICE, data_dir)
    assert first is not None and first.root.created
    first_pem = public_key_pem(first.public_key)
    first.close()

    swtpm.restart()
    second = create_signer(tpm_settings(swtpm), DEVICE, data_dir)
    assert second is not None
    try:
        assert not second.root.created
        assert public_key_pem(second.public_key) == first_pem
        record = json.loads((data_dir / "identity.json").read_text())
        assert record["public_key_pem"] == first_pem
        # The TPM itself, asked by another tool, holds that key at the handle.
        tpm2(swtpm, "readpublic", "-c", hex(HANDLE), "-f", "pem", "-o", str(tmp_path / "tpm.pem"))
        assert (tmp_path / "tpm.pem").read_text() == first_pem
        independent_verify(signed_reply(second), first_pem)
    finally:
        second.close()
    assert transient_handles(swtpm) == ""


@pytest.mark.parametrize("mode", ["delegated", "strict"])
def test_replies_errors_and_records_verify_with_the_device_key_alone(
    swtpm: SwtpmProcess, data_dir: Path, mode: str
) -> None:
    signer = create_signer(tpm_settings(swtpm, mode=mode), DEVICE, data_dir)
    assert signer is not None
    device_pem = public_key_pem(signer.public_key)
    try:
        binding = ReplyBinding.for_request("client-a", 7, REQUEST)
        reply = encode_message(
            sign_reply({"jsonrpc": "2.0", "id": 7, "result": {"scores": [0.5, float("nan")]}}, signer, binding)
        )
        error = encode_message(
            sign_reply({"jsonrpc": "2.0", "id": 7, "error": {"code": -32602, "message": "bad"}}, signer, binding)
        )
        status = encode_message(sign_record({"state": "ready", "uptime_s": 12.5}, signer))
    finally:
        signer.close()

    parsed = independent_verify(reply, device_pem, request_digest=request_sha256(REQUEST))
    assert parsed["result"]["scores"] == [0.5, "NaN"]
    assert parsed["result"]["_meta"]["client_id"] == "client-a"
    assert "sig" in json.loads(error)["error"]["data"]
    assert json.loads(error)["error"]["data"]["request_id"] == 7
    independent_verify(error, device_pem, request_digest=request_sha256(REQUEST))
    independent_verify(status, device_pem)

    for raw in (reply, error, status):
        verified = verify_message(raw, device_pem, expected_device_id=DEVICE)
        assert verified.mode == mode
        assert verified.device_id in (DEVICE, None)
    header = json.loads(base64.urlsafe_b64decode(json.loads(status)["sig"].split(".")[0] + "=="))
    assert ("x5c" in header) == (mode == "delegated")


def test_strict_mode_signs_every_message_in_the_tpm(swtpm: SwtpmProcess, data_dir: Path) -> None:
    signer = create_signer(tpm_settings(swtpm, mode="strict"), DEVICE, data_dir)
    assert signer is not None and signer.mode == "strict"
    try:
        before = signer.root.operations
        messages = [signed_reply(signer, n=n) for n in range(5)]
        assert signer.root.operations == before + 5
        for raw in messages:
            independent_verify(raw, public_key_pem(signer.public_key))
            assert verify_message(raw, signer.public_key).certificate is None
    finally:
        signer.close()
    assert transient_handles(swtpm) == ""


def test_a_signer_reconnects_after_the_tpm_daemon_restarts(swtpm: SwtpmProcess, data_dir: Path) -> None:
    strict = create_signer(tpm_settings(swtpm, mode="strict"), DEVICE, data_dir)
    assert strict is not None
    try:
        device_pem = public_key_pem(strict.public_key)
        independent_verify(signed_reply(strict), device_pem)
        swtpm.kill()
        swtpm.start()
        independent_verify(signed_reply(strict), device_pem)
        swtpm.stop()
        with pytest.raises(SigningError, match="cannot reach the TPM"):
            signed_reply(strict)
        swtpm.start()
        independent_verify(signed_reply(strict), device_pem)
    finally:
        strict.close()
    assert transient_handles(swtpm) == ""


def test_a_missing_tpm_is_an_error_not_a_hang(data_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings = Signing(backend="tpm", tcti=f"swtpm:host=127.0.0.1,port={closed_port}", tpm_timeout_s=2.0)
    with pytest.raises(SigningError, match="cannot reach the TPM"):
        create_signer(settings, DEVICE, data_dir)
    assert not (data_dir / "identity.json").exists()


def test_a_tpm_that_never_answers_times_out(data_dir: Path) -> None:
    with socket.socket() as silent, socket.socket() as control:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        silent.listen()  # accepts connections (in the backlog) and never answers a command
        try:
            control.bind(("127.0.0.1", port + 1))
            control.listen()
        except OSError:
            pytest.skip("the port after the silent one is taken")
        settings = Signing(backend="tpm", tcti=f"swtpm:host=127.0.0.1,port={port}", tpm_timeout_s=0.5)
        with pytest.raises(SigningError, match="did not answer"):
            create_signer(settings, DEVICE, data_dir)


@needs_tpm2_tools
def test_a_different_key_at_the_handle_is_refused(swtpm: SwtpmProcess, data_dir: Path, tmp_path: Path) -> None:
    signer = create_signer(tpm_settings(swtpm), DEVICE, data_dir)
    assert signer is not None
    signer.close()
    tpm2(swtpm, "evictcontrol", "-C", "o", "-c", hex(HANDLE))
    with pytest.raises(SigningError, match="no device key at TPM handle"):
        create_signer(tpm_settings(swtpm), DEVICE, data_dir)

    # Someone persists another signing key at the same handle.
    tpm2(
        swtpm, "createprimary", "-C", "o", "-G", "ecc256:ecdsa-sha256",
        "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign|noda", "-c", "other.ctx", cwd=tmp_path,
    )  # fmt: skip
    tpm2(swtpm, "evictcontrol", "-C", "o", "-c", "other.ctx", hex(HANDLE), cwd=tmp_path)
    with pytest.raises(SigningError, match="refusing to sign with another key"):
        create_signer(tpm_settings(swtpm), DEVICE, data_dir)
    assert transient_handles(swtpm) == ""


@needs_tpm2_tools
def test_an_unsuitable_object_at_the_handle_is_refused(swtpm: SwtpmProcess, data_dir: Path, tmp_path: Path) -> None:
    tpm2(swtpm, "createprimary", "-C", "o", "-G", "ecc256", "-c", "storage.ctx", cwd=tmp_path)  # restricted
    tpm2(swtpm, "evictcontrol", "-C", "o", "-c", "storage.ctx", hex(HANDLE), cwd=tmp_path)
    with pytest.raises(SigningError, match="not an unrestricted"):
        create_signer(tpm_settings(swtpm), DEVICE, data_dir)


@needs_tpm2_tools
def test_a_tpm_in_lockout_is_a_clear_error(swtpm: SwtpmProcess, data_dir: Path, tmp_path: Path) -> None:
    signer = create_signer(tpm_settings(swtpm), DEVICE, data_dir)
    assert signer is not None
    signer.close()
    tpm2(swtpm, "dictionarylockout", "-s", "-n", "1", "-t", "1000", "-l", "1000")
    tpm2(swtpm, "createprimary", "-C", "o", "-G", "ecc", "-p", "secret", "-c", "parent.ctx", cwd=tmp_path)
    tpm2(swtpm, "create", "-C", "parent.ctx", "-P", "wrong", "-G", "ecc", "-u", "a.pub", "-r", "a.priv",
         cwd=tmp_path, check=False)  # fmt: skip
    with pytest.raises(SigningError, match="lockout"):
        create_signer(tpm_settings(swtpm), DEVICE, data_dir)


def test_wrong_owner_auth_is_a_clear_error(swtpm: SwtpmProcess, data_dir: Path) -> None:
    # The swtpm's owner auth is empty; claiming one makes creating the key fail authorization.
    with pytest.raises(SigningError, match="owner authorization"):
        create_signer(tpm_settings(swtpm, owner_auth="not-the-owner-password"), DEVICE, data_dir)


# ---------------------------------------------------------------- tampering and replay


@pytest.mark.filterwarnings("error::cryptography.utils.CryptographyDeprecationWarning")
@pytest.mark.parametrize("mode", ["delegated", "strict"])
def test_changing_any_byte_breaks_verification(swtpm: SwtpmProcess, data_dir: Path, mode: str) -> None:
    signer = create_signer(tpm_settings(swtpm, mode=mode), DEVICE, data_dir)
    assert signer is not None
    raw = signed_reply(signer, scores=[0.25, 0.75])
    device_pem = public_key_pem(signer.public_key)
    signer.close()
    verify_message(raw, device_pem)
    for index in range(len(raw)):
        for flip in (0x01, 0x20):
            tampered = raw[:index] + bytes([raw[index] ^ flip]) + raw[index + 1 :]
            with pytest.raises(SigningError):
                verify_message(tampered, device_pem)
            with pytest.raises(Exception):  # noqa: B017  # any failure will do; it must not pass
                independent_verify(tampered, device_pem)


def test_a_reply_moved_to_another_request_fails(tpm_signer: Signer) -> None:
    raw = signed_reply(tpm_signer)
    device_pem = public_key_pem(tpm_signer.public_key)
    verify_message(raw, device_pem, expected_request_sha256=request_sha256(REQUEST))
    assert (
        reason_of(lambda: verify_message(raw, device_pem, expected_request_sha256=request_sha256(OTHER_REQUEST)))
        == "request_mismatch"
    )
    with pytest.raises(ValueError, match="another request"):
        independent_verify(raw, device_pem, request_digest=request_sha256(OTHER_REQUEST))

    # Rewriting the digest to match the other request breaks the signature instead.
    message = json.loads(raw)
    message["result"]["_meta"]["request_sha256"] = request_sha256(OTHER_REQUEST)
    moved = encode_message(message)
    assert reason_of(lambda: verify_message(moved, device_pem)) == "bad_signature"


def test_unsigned_messages_fail(tpm_signer: Signer) -> None:
    unsigned = encode_message({"jsonrpc": "2.0", "id": 7, "result": {"content": []}})
    assert reason_of(lambda: verify_message(unsigned, tpm_signer.public_key)) == "unsigned"
    assert reason_of(lambda: verify_message(b"not json", tpm_signer.public_key)) == "malformed"
    twice = json.loads(signed_reply(tpm_signer))
    twice["sig"] = twice["result"]["_meta"]["sig"]
    assert reason_of(lambda: verify_message(encode_message(twice), tpm_signer.public_key)) == "malformed"


def test_an_expired_delegation_certificate_fails(tpm_signer: Signer) -> None:
    now = datetime.now(UTC)
    old = issue_delegation(tpm_signer.root, DEVICE, now=now - timedelta(hours=3), lifetime=timedelta(hours=1))
    device_pem = public_key_pem(tpm_signer.public_key)

    # A key leaked from a past rotation cannot sign messages dated after its certificate ran out...
    stale = forged_reply(old, iat=int(now.timestamp()))
    assert reason_of(lambda: verify_message(stale, device_pem)) == "certificate_expired"
    with pytest.raises(ValueError, match="not valid at iat"):
        independent_verify(stale, device_pem)

    # ...while what it signed in its window stays verifiable later (messages wait in the outbox).
    timely = forged_reply(old, iat=int((now - timedelta(hours=2, minutes=30)).timestamp()))
    verify_message(timely, device_pem, now=time.time() + 86400)
    independent_verify(timely, device_pem)

    # A verifier remembering checked certificates still checks each message's iat against the validity.
    checked = CheckedCertificates()
    verify_message(timely, device_pem, checked=checked)
    assert reason_of(lambda: verify_message(stale, device_pem, checked=checked)) == "certificate_expired"


def test_a_foreign_delegation_certificate_fails(tpm_signer: Signer, tmp_path: Path) -> None:
    impostor = SoftwareRootKey.open(tmp_path / "impostor.pem", create=True)
    foreign = issue_delegation(impostor, DEVICE, now=datetime.now(UTC), lifetime=timedelta(hours=1))
    raw = forged_reply(foreign, iat=int(time.time()))
    device_pem = public_key_pem(tpm_signer.public_key)
    assert reason_of(lambda: verify_message(raw, device_pem)) == "foreign_certificate"
    with pytest.raises(InvalidSignature):
        independent_verify(raw, device_pem)
    # And a genuine certificate of this device key, but naming another device, is not this device's.
    other_device = issue_delegation(tpm_signer.root, "pi-garage-02", now=datetime.now(UTC), lifetime=timedelta(hours=1))
    named_wrong = forged_reply(other_device, iat=int(time.time()))
    assert reason_of(lambda: verify_message(named_wrong, device_pem, expected_device_id=DEVICE)) == "device_mismatch"
    # A certificate remembered as issued by one key is not thereby trusted for another.
    checked = CheckedCertificates()
    verify_message(raw, impostor.public_key, checked=checked)
    assert reason_of(lambda: verify_message(raw, device_pem, checked=checked)) == "foreign_certificate"


# ---------------------------------------------------------------- delegated mode: the TPM off the hot path


def test_delegated_mode_uses_the_tpm_only_to_rotate(swtpm: SwtpmProcess, data_dir: Path) -> None:
    delayed = create_signer(tpm_settings(swtpm), DEVICE, data_dir, tpm_delay_s=0.03)
    assert isinstance(delayed, DelegatedSigner)
    try:
        at_start = delayed.root.operations
        first = [signed_reply(delayed, n=n) for n in range(200)]
        assert delayed.root.operations == at_start
        delayed.rotate()
        assert delayed.root.operations == at_start + 1
        second = [signed_reply(delayed, n=n) for n in range(200)]
        assert delayed.root.operations == at_start + 1
        device_pem = public_key_pem(delayed.public_key)
        for raw in first[:3] + second[:3]:
            independent_verify(raw, device_pem)
        assert verify_message(first[0], device_pem).kid != verify_message(second[0], device_pem).kid
    finally:
        delayed.close()


def test_a_clock_jump_past_the_certificate_certifies_a_new_key(swtpm: SwtpmProcess, data_dir: Path) -> None:
    now = [time.time() - 30 * 86400]  # booted with a stale clock, as a Pi without RTC does
    signer = create_signer(tpm_settings(swtpm, rotate_minutes=10), DEVICE, data_dir, clock=lambda: now[0])
    assert signer is not None
    try:
        before_jump = signed_reply(signer)
        operations = signer.root.operations
        now[0] = time.time()  # NTP sets the real time
        after_jump = signed_reply(signer)
        assert signer.root.operations == operations + 1
        device_pem = public_key_pem(signer.public_key)
        for raw in (before_jump, after_jump):
            independent_verify(raw, device_pem)
            verify_message(raw, device_pem)
    finally:
        signer.close()


def test_certificate_by_reference_needs_the_published_certificate(tmp_path: Path, data_dir: Path) -> None:
    published: list[x509.Certificate] = []
    signer = create_signer(
        software_settings(tmp_path, certificate_header="x5t#S256"), DEVICE, data_dir, on_rotate=published.append
    )
    assert isinstance(signer, DelegatedSigner)
    try:
        raw = signed_reply(signer)
        assert len(raw) < 1000  # no certificate inside
        assert published == [signer.certificate]
        verify_message(raw, signer.public_key, certificates=published)
        assert reason_of(lambda: verify_message(raw, signer.public_key)) == "certificate_invalid"
    finally:
        signer.close()


def test_a_bug_in_a_background_rotation_is_counted_and_rotation_goes_on(tmp_path: Path, data_dir: Path) -> None:
    calls: list[x509.Certificate] = []

    def on_rotate(certificate: x509.Certificate) -> None:
        calls.append(certificate)
        if len(calls) == 2:  # the first background rotation; the first call is the signer's own start
            raise RuntimeError("planted by the test")

    before = INTERNAL_ERRORS.counts()["signing_rotation"]
    # 0.6 s between rotations, a failed one retried a tenth of that later.
    signer = create_signer(software_settings(tmp_path, rotate_minutes=0.01), DEVICE, data_dir, on_rotate=on_rotate)
    try:
        deadline = time.monotonic() + 30
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 3, "rotation stopped after the failure"
        assert INTERNAL_ERRORS.counts()["signing_rotation"] == before + 1
    finally:
        signer.close()


# ---------------------------------------------------------------- software backend and identity


def test_software_key_file_is_private_and_announced(
    tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = software_settings(tmp_path)
    with caplog.at_level(logging.WARNING, logger="agent.signing"):
        signer = create_signer(settings, DEVICE, data_dir)
    assert signer is not None
    signer.close()
    assert any("development only" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert settings.key_file is not None
    assert stat.S_IMODE(settings.key_file.stat().st_mode) == 0o600
    settings.key_file.chmod(0o640)
    with pytest.raises(SigningError, match="chmod 600"):
        create_signer(settings, DEVICE, data_dir)


def test_software_and_none_backends_work_without_the_tss_libraries(tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from agent.config import Signing; "
        "from agent.signing import create_signer, sign_record, verify_message; "
        f"d = Path({str(tmp_path)!r}); "
        "assert create_signer(Signing(backend='none'), 'd', d) is None; "
        "s = create_signer(Signing(backend='software', key_file=d / 'k.pem'), 'd', d); "
        "verify_message(sign_record({'a': 1}, s), s.public_key); s.close(); "
        "assert 'tpm2_pytss' not in sys.modules, 'tpm2_pytss imported'"
    )
    repo = Path(__file__).parent.parent
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repo)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("backend", ["tpm", "software"])
def test_identity_init_and_show_give_the_key_and_a_csr(
    backend: str, swtpm: SwtpmProcess, tmp_path: Path, data_dir: Path
) -> None:
    settings = tpm_settings(swtpm) if backend == "tpm" else software_settings(tmp_path)
    with pytest.raises(SigningError, match="identity init"):
        show_identity(settings, DEVICE, data_dir)
    created = init_identity(settings, DEVICE, data_dir)
    shown = show_identity(settings, DEVICE, data_dir)
    assert created.created and not shown.created
    assert created.public_key_pem == shown.public_key_pem
    csr = x509.load_pem_x509_csr(shown.csr_pem.encode())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
    assert (
        csr.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
        == shown.public_key_pem
    )
    signer = create_signer(settings, DEVICE, data_dir)
    assert signer is not None
    assert public_key_pem(signer.public_key) == created.public_key_pem
    signer.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_delegation_chain_verifies_with_openssl(tmp_path: Path, data_dir: Path) -> None:
    """Fleet CA -> device certificate (from the CSR) -> delegation certificate, checked by `openssl verify`."""
    settings = software_settings(tmp_path)
    identity = init_identity(settings, DEVICE, data_dir)
    csr = x509.load_pem_x509_csr(identity.csr_pem.encode())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet CA")])
    now = datetime.now(UTC)

    def certify(builder: x509.CertificateBuilder) -> bytes:
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    base = x509.CertificateBuilder().issuer_name(ca_name).serial_number(x509.random_serial_number())
    base = base.not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
    ca_pem = certify(
        base.subject_name(ca_name).public_key(ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
    )  # fmt: skip
    device_builder = base.subject_name(csr.subject).public_key(csr.public_key())
    for extension in csr.extensions:  # the fleet CA grants what the CSR asks for
        device_builder = device_builder.add_extension(extension.value, critical=extension.critical)
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    (tmp_path / "device.pem").write_bytes(certify(device_builder))

    signer = create_signer(settings, DEVICE, data_dir)
    assert isinstance(signer, DelegatedSigner)
    (tmp_path / "delegation.pem").write_bytes(signer.certificate.public_bytes(serialization.Encoding.PEM))
    signer.close()
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", "ca.pem", "-untrusted", "device.pem", "delegation.pem"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_documented_verification_example_works(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = (Path(__file__).parent.parent / "docs" / "signing.md").read_text()
    match = re.search(r"```python\n(.*?)```", docs, re.DOTALL)
    assert match is not None
    example = compile(match.group(1), "docs/signing.md", "exec")
    signer = create_signer(software_settings(tmp_path), DEVICE, data_dir)
    assert signer is not None
    reply = signed_reply(signer)
    (tmp_path / "device.pem").write_text(public_key_pem(signer.public_key))
    signer.close()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reply.json").write_bytes(reply)
    exec(example, {})
    forged = reply.replace(b'"text":"cat"', b'"text":"dog"')
    assert forged != reply
    (tmp_path / "reply.json").write_bytes(forged)
    with pytest.raises(InvalidSignature):
        exec(example, {})


# ---------------------------------------------------------------- canonicalisation (property tests)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3)
)
json_like = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


@given(json_like)
def test_normalised_values_survive_the_wire_byte_for_byte(value: Any) -> None:
    normalised = normalise(value)
    canonical = canonical_bytes(normalised)
    assert canonical_bytes(normalise(value)) == canonical
    assert normalise(normalised) == normalised
    # A verifier parses the published bytes and re-canonicalises: it must get the signed bytes back.
    assert canonical_bytes(parse_json(canonical)) == canonical
    if not _has_unsafe_integral_float(normalised):
        assert rfc8785.dumps(json.loads(canonical)) == canonical


@given(st.dictionaries(st.text(max_size=8), scalars, max_size=8))
def test_key_order_does_not_change_the_canonical_form(value: dict[str, Any]) -> None:
    reordered = dict(reversed(list(value.items())))
    assert canonical_bytes(normalise(reordered)) == canonical_bytes(normalise(value))


def test_values_jcs_cannot_carry_have_defined_encodings() -> None:
    value = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "big": 2**64 - 1, "neg": -(2**53), "z": -0.0}
    assert normalise(value) == {
        "nan": "NaN", "inf": "Infinity", "ninf": "-Infinity", "big": "18446744073709551615",
        "neg": "-9007199254740992", "z": 0,
    }  # fmt: skip
    assert normalise({"edge": 2**53 - 1}) == {"edge": 2**53 - 1}
    with pytest.raises(SigningError):
        normalise({"bytes": b"\x00"})
    with pytest.raises(SigningError):
        normalise({1: "non-string key"})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_like)
def test_any_result_signs_and_verifies(tmp_path: Path, value: Any) -> None:
    signer = create_signer(Signing(backend="software", key_file=tmp_path / "k.pem"), DEVICE, tmp_path)
    assert signer is not None
    try:
        raw = encode_message(
            sign_reply({"jsonrpc": "2.0", "id": 1, "result": {"value": value}}, signer,
                       ReplyBinding.for_request("c", 1, b"{}"))
        )  # fmt: skip
        verified = verify_message(raw, signer.public_key, expected_request_sha256=hashlib.sha256(b"{}").hexdigest())
        assert verified.message["result"]["value"] == parse_json(canonical_bytes(normalise(value)))
    finally:
        signer.close()


def _has_unsafe_integral_float(value: Any) -> bool:
    """Python's json reads 1e20 as an int that JCS refuses; parse_json reads it as JCS does (a double)."""
    if isinstance(value, float):
        return value.is_integer() and abs(value) > 2**53 - 1 and abs(value) < 1e21
    if isinstance(value, dict):
        return any(_has_unsafe_integral_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_unsafe_integral_float(v) for v in value)
    return False


container_members = st.dictionaries(
    st.sampled_from(["a", "rank", "sig", "sig2", "si", "z", "~", "é"]) | st.text(max_size=4), json_like, max_size=4
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_like, members=container_members, as_error=st.booleans())
def test_the_spliced_encoding_publishes_what_sign_reply_signs(
    tmp_path: Path, value: Any, members: dict[str, Any], as_error: bool
) -> None:
    # One serialisation with a placeholder signature, cut out to sign and replaced to publish: whatever
    # members sort before or after "sig" in the container, the published bytes verify and carry the same
    # message as the two-step path.
    signer = create_signer(Signing(backend="software", key_file=tmp_path / "k.pem"), DEVICE, tmp_path)
    assert signer is not None
    if as_error:
        reply = {"jsonrpc": "2.0", "id": 7, "error": {"code": -32000, "message": "m", "data": {**members, "v": value}}}
    else:
        reply = {"jsonrpc": "2.0", "id": 7, "result": {"value": value, "_meta": dict(members)}}
    binding = ReplyBinding.for_request("c", 7, b"{}")
    try:
        iat = signer.now()
        raw = encode_signed_reply(reply, signer, binding, iat=iat)
        verified = verify_message(raw, signer.public_key, expected_request_sha256=hashlib.sha256(b"{}").hexdigest())
        two_step = sign_reply(reply, signer, binding, iat=iat)
        for message in (verified.message, two_step):
            holder = message["error"]["data"] if as_error else message["result"]["_meta"]
            holder.pop("sig")
        assert verified.message == parse_json(canonical_bytes(two_step))
    finally:
        signer.close()


def test_a_reply_that_holds_the_placeholder_is_still_signed_correctly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The placeholder is 128 random bits; force a collision to exercise the two-step path it falls back to.
    monkeypatch.setattr("agent.signing.message._PLACEHOLDER", "f" * 32)
    signer = create_signer(Signing(backend="software", key_file=tmp_path / "k.pem"), DEVICE, tmp_path)
    assert signer is not None
    try:
        reply = {"jsonrpc": "2.0", "id": 1, "result": {"text": "f" * 32}}
        raw = encode_signed_reply(reply, signer, ReplyBinding.for_request("c", 1, b"{}"))
        verified = verify_message(raw, signer.public_key, expected_request_sha256=hashlib.sha256(b"{}").hexdigest())
        assert verified.message["result"]["text"] == "f" * 32
    finally:
        signer.close()


@settings(max_examples=40, deadline=None)
@given(header=st.dictionaries(st.text(max_size=8), st.text(max_size=40), max_size=4), payload=st.binary(max_size=300))
def test_a_hashed_header_signs_the_same_input_as_the_header_itself(header: dict[str, str], payload: bytes) -> None:
    # The digest handed to the key stands in for the signature, so the tokens differ if the inputs do.
    encoded = protected_header(header)
    token = sign_detached_after(encoded, header_hash(encoded), payload, lambda digest: digest + digest)
    assert token == sign_detached(encoded, payload, lambda digest: digest + digest)

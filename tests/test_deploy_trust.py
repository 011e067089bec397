"""Signed deployment documents, bundle manifests and key lists: what is accepted and what is refused."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.deploy.trust import SignedClock, Trust, kernel_clock_synchronised, load_public_key, sign_document
from agent.errors import DeployError
from agent.signing.jws import jwk_thumbprint
from tests.fixtures.deploy_bundles import MemoryStore, Publisher, build_bundle, new_key

PUBLISHER = Publisher()
BUNDLE = build_bundle(PUBLISHER.release)


def trust_for(
    publisher: Publisher, store: MemoryStore | None = None, wall: float | None = None, synchronised: bool = False
) -> Trust:
    """A device trusting ``publisher``; its clock reads ``wall`` (else the real time) and is synchronised only if
    said, whatever this machine's own NTP state."""
    store = store or MemoryStore()
    clock = SignedClock(store, (lambda: wall) if wall is not None else time.time, lambda: synchronised)
    return Trust([load_public_key(publisher.release_pem)], load_public_key(publisher.root_pem), store, clock)


def test_a_signed_deployment_and_its_bundle_verify() -> None:
    document = trust_for(PUBLISHER).verify_deployment(PUBLISHER.deployment(BUNDLE, sequence=5))
    assert document.sequence == 5 and document.bundle is not None
    assert trust_for(PUBLISHER).verify_manifest(document.bundle).bundle_id == "vibration-anomaly@2.0.0"


def test_a_document_signed_by_an_unknown_key_is_refused() -> None:
    with pytest.raises(DeployError, match="not trusted"):
        trust_for(PUBLISHER).verify_deployment(PUBLISHER.deployment(BUNDLE, key=new_key()))


def test_a_deployment_carrying_a_manifest_signed_by_an_unknown_key_is_refused() -> None:
    foreign = build_bundle(new_key())
    with pytest.raises(DeployError, match="bundle refused: .*not trusted"):
        trust_for(PUBLISHER).verify_deployment(PUBLISHER.deployment(foreign))


def test_a_manifest_cannot_pass_as_a_deployment_document() -> None:
    raw = BUNDLE.envelope.model_dump_json().encode()
    with pytest.raises(DeployError, match="signed as 'edge-agent-bundle"):
        trust_for(PUBLISHER).verify_deployment(raw)


def test_expired_documents_and_manifests_are_refused() -> None:
    with pytest.raises(DeployError, match="expired"):
        trust_for(PUBLISHER).verify_deployment(PUBLISHER.deployment(BUNDLE, expires=time.time() - 1))
    stale = build_bundle(PUBLISHER.release, expires=time.time() - 1)
    with pytest.raises(DeployError, match="bundle vibration-anomaly@2.0.0 expired"):
        trust_for(PUBLISHER).verify_deployment(PUBLISHER.deployment(stale))


def test_a_clock_set_back_checks_expiry_against_the_last_signed_time_seen_and_says_so() -> None:
    store = MemoryStore()
    now = time.time()
    trust_for(PUBLISHER, store).verify_deployment(PUBLISHER.deployment(BUNDLE, issued_at=now + 7200, expires=now + 9000))
    # After a reboot the clock reads a year ago: a document that expired an hour ago by real time is still refused.
    rebooted = trust_for(PUBLISHER, store, wall=now - 365 * 86400)
    with pytest.raises(DeployError, match="behind the last signed time seen"):
        rebooted.verify_deployment(PUBLISHER.deployment(BUNDLE, expires=now + 3600))
    assert rebooted.clock.now()[1] is not None
    assert trust_for(PUBLISHER, store, wall=now + 8000).clock.now()[1] is None


def test_a_synchronised_clock_is_trusted_even_behind_the_last_signed_time_seen() -> None:
    # A publisher whose clock ran ahead signed "in the future"; once NTP has set this device's clock, it is right.
    store = MemoryStore()
    now = time.time()
    trust_for(PUBLISHER, store).verify_deployment(PUBLISHER.deployment(BUNDLE, issued_at=now + 7200, expires=now + 9000))
    synced = trust_for(PUBLISHER, store, wall=now, synchronised=True)
    assert synced.clock.now() == (now, None)
    document = synced.verify_deployment(PUBLISHER.deployment(BUNDLE, sequence=2, expires=now + 3600))
    assert document.sequence == 2


def test_the_kernels_clock_state_is_read_without_privilege() -> None:
    # This machine may or may not run an NTP daemon; the answer must be a plain yes or no, never an error.
    assert kernel_clock_synchronised() in (True, False)


def test_a_root_signed_key_list_adds_and_revokes_release_keys() -> None:
    store = MemoryStore()
    trust = trust_for(PUBLISHER, store)
    successor = Publisher(root=PUBLISHER.root)
    old_kid = jwk_thumbprint(PUBLISHER.release.public_key())
    with pytest.raises(DeployError, match="not trusted"):
        trust.verify_deployment(successor.deployment(build_bundle(successor.release)))
    trust.accept_key_list(PUBLISHER.key_list(1, [successor.release_pem], revoked=[old_kid]))
    reopened = trust_for(PUBLISHER, store)  # the list persists
    reopened.verify_deployment(successor.deployment(build_bundle(successor.release)))
    with pytest.raises(DeployError, match="not trusted"):
        reopened.verify_deployment(PUBLISHER.deployment(BUNDLE))
    reopened.accept_key_list(PUBLISHER.key_list(2, [successor.release_pem], revoked=[old_kid]))
    with pytest.raises(DeployError, match="older"):
        reopened.accept_key_list(PUBLISHER.key_list(1, []))


def test_key_lists_not_signed_by_the_root_or_expired_are_refused() -> None:
    trust = trust_for(PUBLISHER)
    forged = sign_document({"type": "keylist", "version": 9, "keys": [], "issued_at": 1, "expires": 2e9},
                           PUBLISHER.release, "keylist").model_dump_json().encode()  # fmt: skip
    with pytest.raises(DeployError, match="not trusted"):
        trust.accept_key_list(forged)
    with pytest.raises(DeployError, match="expired"):
        trust.accept_key_list(PUBLISHER.key_list(2, [], expires=time.time() - 5))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_with_a_deploy_error(raw: bytes) -> None:
    with pytest.raises(DeployError):
        trust_for(PUBLISHER).verify_deployment(raw)


def test_a_deeply_nested_document_is_refused_with_a_deploy_error() -> None:
    # json raises RecursionError, not a ValueError; it escaped verification (found by the deploy_document fuzz target).
    with pytest.raises(DeployError, match="nested too deeply"):
        trust_for(PUBLISHER).verify_deployment(b"[" * 100_000)
    with pytest.raises(DeployError, match="nested too deeply"):
        trust_for(PUBLISHER).accept_key_list(b"[" * 100_000)


SIGNED = json.loads(PUBLISHER.deployment(BUNDLE, sequence=3))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["sequence", "deployment_id", "action", "expires", "issued_at", "target"]),
       st.one_of(st.integers(-5, 10**6), st.text(max_size=8), st.none(), st.booleans()))  # fmt: skip
def test_any_change_to_a_signed_payload_is_refused(name: str, value: object) -> None:
    changed = json.loads(json.dumps(SIGNED))
    if changed["payload"].get(name) == value:
        return
    changed["payload"][name] = value
    with pytest.raises(DeployError, match="does not match|refused"):
        trust_for(PUBLISHER).verify_deployment(json.dumps(changed).encode())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 200_000), st.integers(128, 131_072))
def test_manifests_with_any_chunking_verify_and_chunks_over_128k_are_refused(size: int, chunk_size: int) -> None:
    bundle = build_bundle(PUBLISHER.release, data=bytes(size), chunk_size=chunk_size)
    described = trust_for(PUBLISHER).verify_manifest(bundle.envelope).files[0]
    assert sum(described.chunk_length(i) for i in range(len(described.chunks))) == size
    oversized = {**bundle.envelope.payload["files"][0], "chunk_size": 131_073}
    with pytest.raises(DeployError, match="chunk_size"):
        trust_for(PUBLISHER).verify_manifest(
            sign_document({**bundle.envelope.payload, "files": [oversized]}, PUBLISHER.release, "bundle")
        )


def test_keys_load_from_pem_text_or_a_file_and_the_config_refuses_unusable_groups(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    from agent.config import DeploySettings

    path = tmp_path / "release.pem"
    path.write_text(PUBLISHER.release_pem)
    assert load_public_key(path).public_numbers() == load_public_key(PUBLISHER.release_pem).public_numbers()
    with pytest.raises(DeployError, match="unusable deployment key"):
        load_public_key(tmp_path / "missing.pem")
    with pytest.raises(ValidationError):
        DeploySettings(groups=["line/3"])

"""Release keys kept with the fleet's CAs: a root key that signs key lists and the release keys that sign bundles
and deployment documents (the device side verifies both with :mod:`agent.deploy.trust`).

Layout under the fleet directory (keep ``*-key.pem`` offline and backed up, like ``ca/``)::

    release/root.pem, root-key.pem     the root key: provisioned into every device, signs key lists only
    release/keys/<kid>.pem, -key.pem   release keys, named by their RFC 7638 thumbprint
    release/state.json                 the signing key in use, the key list version, revoked kids
    release/keylist.json               the signed key list in force (retained on ``mcp/deploy/keys``)

Rotation adds a key and makes it the signing key; revocation lists a kid as revoked. Either signs a new key
list with a higher version: devices adopt it from the retained topic without being provisioned again.
"""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field

from agent.deploy.documents import SignedEnvelope
from agent.deploy.trust import KeyList, public_pem, sign_document
from agent.errors import ProvisioningError
from agent.signing.jws import jwk_thumbprint
from provisioning import ca as x509ca
from provisioning.records import write_if_changed

KEY_LIST_DAYS = 365

PUBLIC, PRIVATE = 0o644, 0o600


class ReleaseState(BaseModel):
    """What ``release/state.json`` holds."""

    model_config = ConfigDict(extra="forbid")

    signing_kid: str
    key_list_version: int = Field(ge=1)
    revoked: list[str] = Field(default_factory=list)


class ReleaseKeys:
    """The release keys of one fleet directory."""

    def __init__(self, fleet_dir: Path) -> None:
        self.root_dir = fleet_dir / "release"
        self.written: list[Path] = []

    @property
    def root_public_path(self) -> Path:
        return self.root_dir / "root.pem"

    @property
    def key_list_path(self) -> Path:
        return self.root_dir / "keylist.json"

    @property
    def _state_path(self) -> Path:
        return self.root_dir / "state.json"

    def exists(self) -> bool:
        return self._state_path.exists()

    def init(self, days: int = KEY_LIST_DAYS) -> None:
        """Create the root key, a first release key and key list version 1; does nothing if they exist."""
        if self.exists():
            return
        root = x509ca.new_key()
        self._write(self.root_dir / "root-key.pem", x509ca.private_key_pem(root), PRIVATE)
        self._write(self.root_public_path, public_pem(root.public_key()).encode())
        kid = self._new_release_key()
        self._save(ReleaseState(signing_kid=kid, key_list_version=1), days)

    def rotate(self, *, revoke_old: bool = False, days: int = KEY_LIST_DAYS) -> str:
        """A new release key becomes the signing key (the old one stays trusted unless ``revoke_old``); returns its kid."""
        state = self._state()
        kid = self._new_release_key()
        revoked = [*state.revoked, state.signing_kid] if revoke_old else state.revoked
        self._save(ReleaseState(signing_kid=kid, key_list_version=state.key_list_version + 1, revoked=revoked), days)
        return kid

    def revoke(self, kid: str, days: int = KEY_LIST_DAYS) -> None:
        """List ``kid`` as revoked in a new key list; the signing key cannot be revoked (rotate first)."""
        state = self._state()
        if kid not in self.kids():
            raise ProvisioningError(f"no release key {kid!r} in {self.root_dir / 'keys'}")
        if kid == state.signing_kid:
            raise ProvisioningError(f"{kid} is the signing key: `fleet rotate-release-key --revoke-old` replaces it")
        if kid in state.revoked:
            return
        self._save(state.model_copy(update={"key_list_version": state.key_list_version + 1,
                                            "revoked": [*state.revoked, kid]}), days)  # fmt: skip

    def refresh(self, days: int = KEY_LIST_DAYS) -> None:
        """Sign the same keys again as a new key list version (before the list in force expires)."""
        state = self._state()
        self._save(state.model_copy(update={"key_list_version": state.key_list_version + 1}), days)

    def kids(self) -> list[str]:
        return sorted(path.stem for path in (self.root_dir / "keys").glob("*.pem") if not path.stem.endswith("-key"))

    def trusted_pems(self) -> list[str]:
        """PEM text of every release key not revoked (what a newly provisioned device trusts)."""
        revoked = set(self._state().revoked)
        return [(self.root_dir / "keys" / f"{kid}.pem").read_text() for kid in self.kids() if kid not in revoked]

    def signing_key(self) -> ec.EllipticCurvePrivateKey:
        """The private release key bundles and deployment documents are signed with."""
        return x509ca.load_private_key(self.root_dir / "keys" / f"{self._state().signing_kid}-key.pem")

    def key_list(self) -> bytes:
        """The signed key list in force, as published."""
        self._state()
        return self.key_list_path.read_bytes()

    def _state(self) -> ReleaseState:
        if not self.exists():
            raise ProvisioningError(f"no release keys in {self.root_dir}: run `fleet init-release-key`")
        return ReleaseState.model_validate_json(self._state_path.read_text())

    def _new_release_key(self) -> str:
        key = x509ca.new_key()
        kid = jwk_thumbprint(key.public_key())
        self._write(self.root_dir / "keys" / f"{kid}-key.pem", x509ca.private_key_pem(key), PRIVATE)
        self._write(self.root_dir / "keys" / f"{kid}.pem", public_pem(key.public_key()).encode())
        return kid

    def _save(self, state: ReleaseState, days: int) -> None:
        root = x509ca.load_private_key(self.root_dir / "root-key.pem")
        revoked = set(state.revoked)
        keys = [(self.root_dir / "keys" / f"{kid}.pem").read_text() for kid in self.kids() if kid not in revoked]
        now = time.time()
        key_list = KeyList(version=state.key_list_version, keys=tuple(keys), revoked=tuple(state.revoked),
                           issued_at=now, expires=now + days * 86400.0)  # fmt: skip
        envelope: SignedEnvelope = sign_document(key_list.model_dump(mode="json"), root, "keylist")
        self._write(self.key_list_path, envelope.model_dump_json().encode())
        self._write(self._state_path, state.model_dump_json(indent=2).encode() + b"\n")

    def _write(self, path: Path, data: bytes, mode: int = PUBLIC) -> None:
        if write_if_changed(path, data, mode):
            self.written.append(path)

"""The device key inside a TPM 2.0, through tpm2-pytss (ESAPI). The only module that imports tpm2_pytss.

The key is an unrestricted ECC P-256 signing key (ECDSA SHA-256) created under the owner hierarchy and made
persistent at a configurable handle, so it survives restarts and never leaves the TPM. Every TPM call runs
on one dedicated thread (ESAPI contexts are not thread-safe) and the caller waits at most ``timeout_s``,
so a hung TPM or TCTI costs a :class:`SigningError`, never a hung agent.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import SigningError
from agent.signing.jws import ES256_PREHASHED, der_from_raw, raw_signature

# The TSS libraries log every TPM error response to stderr; we turn those into SigningErrors with the
# decoded return code instead. Operators can still set TSS2_LOG themselves to see the raw traffic.
os.environ.setdefault("TSS2_LOG", "all+NONE")

try:
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_ECC, TPM2_RC, TPMA_OBJECT
    from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_PUBLIC, TPMT_SIG_SCHEME
except (ImportError, OSError) as exc:  # OSError: the package is there but libtss2 is not
    raise SigningError(
        f'signing.backend = "tpm" needs tpm2-pytss and the tpm2-tss libraries ({exc}); '
        "install with `pip install edge-agent[tpm]` and the libtss2 packages"
    ) from None

logger = logging.getLogger(__name__)

T = TypeVar("T")
TCTI_LAYER = 10 << 16
KEY_ATTRIBUTES = (
    TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)


class _TpmThread:
    """Runs TPM jobs one at a time on a daemon thread; callers wait with a timeout.

    A daemon thread, not a ThreadPoolExecutor: a job stuck in a hung TPM must not block interpreter exit.
    """

    def __init__(self, timeout_s: float, delay_s: float) -> None:
        self.timeout_s = timeout_s
        self.delay_s = delay_s
        self.operations = 0
        self._job_started: float | None = None
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tpm", daemon=True)
        self._thread.start()

    def call(self, what: str, job: Callable[[], T]) -> T:
        started = self._job_started
        if started is not None and time.monotonic() - started > self.timeout_s:
            # Queueing behind a stuck call would only cost the caller another full timeout.
            raise SigningError(
                f"the TPM is not answering ({what}): an earlier call has been stuck for over {self.timeout_s:g} s"
            )
        future: Future[T] = Future()
        self._jobs.put((job, future))
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            future.cancel()
            raise SigningError(f"the TPM did not answer ({what}) within {self.timeout_s:g} s") from None

    def stop(self) -> None:
        self._jobs.put(None)
        if self._job_started is None:
            self._thread.join(self.timeout_s)

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            self._job_started = time.monotonic()
            if self.delay_s:
                time.sleep(self.delay_s)  # injected latency, to model a slow TPM chip
            self.operations += 1
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the waiting caller, which decides
                future.set_exception(exc)
            finally:
                self._job_started = None


class TpmRootKey:
    """The device key at a persistent handle in the TPM. Use :meth:`open`."""

    backend: Literal["tpm"] = "tpm"

    def __init__(self, *, tcti: str, handle: int, owner_auth: str, timeout_s: float, delay_s: float = 0.0) -> None:
        self.tcti = tcti
        self.handle = handle
        self._owner_auth = owner_auth
        self._worker = _TpmThread(timeout_s, delay_s)
        self._esys: Any = None
        self._key: Any = None
        self._public_key: ec.EllipticCurvePublicKey | None = None
        self.created = False
        self._closed = False

    @classmethod
    def open(
        cls,
        *,
        tcti: str,
        handle: int,
        owner_auth: str = "",
        timeout_s: float = 5.0,
        delay_s: float = 0.0,
        create_if_missing: bool = True,
    ) -> TpmRootKey:
        """Connect, find (or create and persist) the key at ``handle`` and prove it signs.

        Raises :class:`SigningError` if the TPM is unreachable, hangs, is in lockout, rejects the owner
        auth, or holds something other than an unrestricted P-256 signing key at ``handle``.
        """
        root = cls(tcti=tcti, handle=handle, owner_auth=owner_auth, timeout_s=timeout_s, delay_s=delay_s)
        try:
            root._public_key = root._call("open", lambda: root._connect(create_if_missing))
            root._self_test()
        except BaseException:
            root.close()
            raise
        return root

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        assert self._public_key is not None, "open() sets the public key"
        return self._public_key

    @property
    def operations(self) -> int:
        return self._worker.operations

    def sign_digest(self, digest: bytes) -> bytes:
        """Have the TPM sign a SHA-256 digest with ECDSA; return raw R || S (each left-padded to 32 bytes)."""
        if self._closed:
            raise SigningError("the TPM key is closed")
        return self._call("sign", lambda: self._sign_reconnecting(digest))

    def close(self) -> None:
        """Forget the persistent handle in ESAPI (the key stays in the TPM) and end the TPM thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call("close", self._disconnect)
        except SigningError as exc:
            logger.warning("closing the TPM context: %s", exc)
        self._worker.stop()

    def _call(self, what: str, job: Callable[[], T]) -> T:
        try:
            return self._worker.call(what, job)
        except TSS2_Exception as exc:
            raise self._explain(exc, what) from None

    def _connect(self, create_if_missing: bool) -> ec.EllipticCurvePublicKey:
        """Runs on the TPM thread. Returns the public key of the key now at the handle."""
        self._esys = ESAPI(self.tcti)
        if self._owner_auth:
            self._esys.tr_set_auth(ESYS_TR.OWNER, self._owner_auth)
        if self._handle_in_use():
            self._key = self._esys.tr_from_tpmpublic(self.handle)
        elif create_if_missing:
            self._key = self._create_persistent_key()
            self.created = True
        else:
            raise SigningError(
                f"no device key at TPM handle {self.handle:#x}, though this device recorded one: the TPM was "
                "cleared or the key evicted, so the device identity is lost; to re-enrol, remove identity.json "
                "from the data directory and run `edge-agent identity init`"
            )
        public, _, _ = self._esys.read_public(self._key)
        if self.created:
            logger.info("created the device key in the TPM at persistent handle %#x", self.handle)
        return _signing_public_key(public.publicArea, self.handle)

    def _handle_in_use(self) -> bool:
        _, data = self._esys.get_capability(TPM2_CAP.HANDLES, self.handle, 1)
        return self.handle in list(data.data.handles)

    def _create_persistent_key(self) -> Any:
        template = TPMT_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=KEY_ATTRIBUTES)
        transient = self._esys.create_primary(None, TPM2B_PUBLIC(template), ESYS_TR.OWNER)[0]
        try:
            return self._esys.evict_control(ESYS_TR.OWNER, transient, self.handle)
        finally:
            # swtpm and many chips hold only three transient objects: never leave one behind.
            self._esys.flush_context(transient)

    def _sign_reconnecting(self, digest: bytes) -> bytes:
        """Runs on the TPM thread. A lost TCTI link (TPM daemon restarted) gets one reconnect per call."""
        if self._esys is not None:
            try:
                return self._sign(digest)
            except TSS2_Exception as exc:
                if exc.rc & 0xFF0000 != TCTI_LAYER:
                    raise
            self._disconnect()
        self._reconnect()
        return self._sign(digest)

    def _reconnect(self) -> None:
        try:
            found = self._connect(create_if_missing=False)
            if _spki(found) != _spki(self.public_key):
                raise SigningError(f"after reconnecting, TPM handle {self.handle:#x} holds a different key")
        except BaseException:
            self._disconnect()
            raise

    def _sign(self, digest: bytes) -> bytes:
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = TPM2_ALG.SHA256
        signature = self._esys.sign(self._key, digest, scheme)
        ecdsa = signature.signature.ecdsa
        return raw_signature(
            int.from_bytes(bytes(ecdsa.signatureR), "big"), int.from_bytes(bytes(ecdsa.signatureS), "big")
        )

    def _disconnect(self) -> None:
        """Runs on the TPM thread."""
        esys, self._esys = self._esys, None
        key, self._key = self._key, None
        if esys is None:
            return
        try:
            if key is not None:
                esys.tr_close(key)
        except TSS2_Exception:
            pass  # the link is already gone; finalising the context below is all that is left
        finally:
            esys.close()

    def _self_test(self) -> None:
        """Sign a fresh digest and verify it: proves the key is usable (no lockout) and matches its public half."""
        digest = os.urandom(32)
        raw = self.sign_digest(digest)
        try:
            self.public_key.verify(der_from_raw(raw), digest, ES256_PREHASHED)
        except InvalidSignature:
            raise SigningError(f"the key at TPM handle {self.handle:#x} signs with another key than it shows") from None

    def _explain(self, exc: TSS2_Exception, what: str) -> SigningError:
        if exc.rc & 0xFF0000 == TCTI_LAYER:
            return SigningError(f"cannot reach the TPM through TCTI {self.tcti!r} ({what}): {exc}")
        if exc.error == TPM2_RC.LOCKOUT:
            return SigningError(
                "the TPM is in dictionary-attack lockout and refuses to use the device key: wait for the "
                "lockout to expire or clear it (tpm2_dictionarylockout --clear-lockout)"
            )
        if exc.error in (TPM2_RC.AUTH_FAIL, TPM2_RC.BAD_AUTH):
            return SigningError(f"the TPM rejected the owner authorization ({what}): check [signing] owner_auth")
        return SigningError(f"TPM error ({what}, handle {self.handle:#x}): {exc}")


def _signing_public_key(public: Any, handle: int) -> ec.EllipticCurvePublicKey:
    attributes = public.objectAttributes
    usable = (
        public.type == TPM2_ALG.ECC
        and public.parameters.eccDetail.curveID == TPM2_ECC.NIST_P256
        and attributes & TPMA_OBJECT.SIGN_ENCRYPT
        and not attributes & TPMA_OBJECT.RESTRICTED
        and attributes & TPMA_OBJECT.FIXEDTPM
    )
    if not usable:
        raise SigningError(
            f"TPM handle {handle:#x} holds an object that is not an unrestricted, TPM-bound P-256 signing key; "
            "choose another [signing] handle or evict it (tpm2_evictcontrol -C o -c <handle>)"
        )
    key = serialization.load_der_public_key(public.to_der())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

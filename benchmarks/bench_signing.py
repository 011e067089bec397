"""Signed replies per second by backend and mode, against unsigned, and the cost of each signing stage.

Run: ``python -m benchmarks.bench_signing``. Each configuration signs the same realistic reply (an MCP
tools/call result with 100 class scores) for about a second, through the real path: normalise, bind, JCS,
JWS, encode. "swtpm delegated +30 ms" adds 30 ms to every TPM operation, like a slow TPM chip.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import Signing
from agent.signing import ReplyBinding, create_signer, encode_message, normalise, sign_reply
from agent.signing.canonical import canonical_bytes
from agent.signing.jws import ES256_PREHASHED, raw_from_der, sign_detached
from agent.signing.signer import Signer
from agent.signing.swtpm import SwtpmProcess

DEVICE = "bench-device"
REQUEST = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"classify","arguments":{}}}'
SECONDS_PER_CONFIG = 1.0
INJECTED_TPM_DELAY_S = 0.030


def sample_reply(request_id: int) -> dict[str, Any]:
    scores = [((i * 7919) % 1000) / 1000.0 for i in range(100)]
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "result": {
            "content": [{"type": "text", "text": "tabby cat (0.93)"}],
            "structuredContent": {"model": "mobilenet_v2", "scores": scores, "top": [[281, 0.93], [285, 0.04]]},
            "isError": False,
        },
    }


def _rate(operation: Callable[[int], object], seconds: float = SECONDS_PER_CONFIG, max_count: int = 100_000) -> float:
    """Operations per second of ``operation(i)``, run for about ``seconds``."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while count < max_count and (count % 8 or time.perf_counter() < deadline):
        operation(count)
        count += 1
    return count / (time.perf_counter() - start)


def _per_call_us(operation: Callable[[], object], seconds: float = 0.5) -> float:
    return 1e6 / _rate(lambda _: operation(), seconds)


def _signed_rate(signer: Signer) -> float:
    binding = ReplyBinding.for_request("bench-client", 1, REQUEST)
    return _rate(lambda i: encode_message(sign_reply(sample_reply(i), signer, binding)))


def _measure_signer(settings: Signing, data_dir: Path, *, tpm_delay_s: float = 0.0) -> dict[str, float]:
    signer = create_signer(settings, DEVICE, data_dir, tpm_delay_s=tpm_delay_s)
    assert signer is not None
    try:
        before = signer.root.operations
        rate = _signed_rate(signer)
        return {"replies_per_s": rate, "tpm_operations_while_signing": signer.root.operations - before}
    finally:
        signer.close()


def _stage_costs() -> dict[str, float]:
    """Microseconds per reply for each stage, with a software key for the signature."""
    reply = sample_reply(1)
    normalised = normalise(reply)
    payload = canonical_bytes(normalised)
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(payload).digest()

    def sign_digest(value: bytes) -> bytes:
        return raw_from_der(key.sign(value, ES256_PREHASHED))

    return {
        "normalise_us": _per_call_us(lambda: normalise(reply)),
        "canonicalize_jcs_us": _per_call_us(lambda: canonical_bytes(normalised)),
        "sha256_us": _per_call_us(lambda: hashlib.sha256(payload).digest()),
        "ecdsa_p256_sign_us": _per_call_us(lambda: sign_digest(digest)),
        "jws_assembly_and_sign_us": _per_call_us(lambda: sign_detached({"kid": "k", "iat": 0}, payload, sign_digest)),
        "payload_bytes": float(len(payload)),
    }


def run() -> dict[str, Any]:
    """Measure every configuration; swtpm rows are absent if swtpm is not installed."""
    results: dict[str, Any] = {"stages": _stage_costs(), "configs": {}}
    configs = results["configs"]
    configs["unsigned"] = {"replies_per_s": _rate(lambda i: encode_message(normalise(sample_reply(i))))}
    with tempfile.TemporaryDirectory(prefix="bench-signing-") as tmp:
        work = Path(tmp)
        key_file = work / "software" / "device.pem"
        for mode in ("delegated", "strict"):
            settings = Signing(backend="software", key_file=key_file, mode=mode)
            configs[f"software {mode}"] = _measure_signer(settings, work / "software")
        if shutil.which("swtpm") is None:
            results["note"] = "swtpm not installed: TPM rows skipped"
            return results
        with SwtpmProcess(work / "swtpm") as tpm:
            for mode in ("strict", "delegated"):
                settings = Signing(backend="tpm", tcti=tpm.tcti, mode=mode)
                configs[f"swtpm {mode}"] = _measure_signer(settings, work / "tpm")
            delay_ms = f"+{INJECTED_TPM_DELAY_S * 1000:.0f} ms"
            for mode in ("delegated", "strict"):
                settings = Signing(backend="tpm", tcti=tpm.tcti, mode=mode)
                configs[f"swtpm {mode} {delay_ms}"] = _measure_signer(
                    settings, work / "tpm", tpm_delay_s=INJECTED_TPM_DELAY_S
                )
    return results


def print_table(results: dict[str, Any]) -> None:
    unsigned = results["configs"]["unsigned"]["replies_per_s"]
    print(f"{'configuration':<28}{'replies/s':>12}{'vs unsigned':>13}{'TPM ops':>9}")
    for name, row in results["configs"].items():
        ops = row.get("tpm_operations_while_signing")
        print(
            f"{name:<28}{row['replies_per_s']:>12,.0f}{row['replies_per_s'] / unsigned:>12.0%}"
            f"{'' if ops is None else ops:>9}"
        )
    print(f"\nper-reply stage cost (payload {results['stages']['payload_bytes']:.0f} bytes JCS):")
    for name, value in results["stages"].items():
        if name.endswith("_us"):
            print(f"  {name[:-3]:<26}{value:>10.1f} us")
    if "note" in results:
        print(f"\n{results['note']}")


if __name__ == "__main__":
    print_table(run())

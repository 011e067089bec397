"""The ``probe_state`` fuzz target: any bytes as ``data_dir/model-probes.json``, the model probe's verdicts kept
across restarts (agent/models/probe.py).

The file is the input as it is (no :class:`~tests.fuzz.fuzzed.FuzzedInput` framing), except that ``@KEY@`` is
replaced by the probe key of this process's runtime, so that seeds (and the fuzzer, from them) reach the
verdicts of a file written for this runtime rather than stopping at a foreign ``runtime``. A damaged file
only costs probes again: nothing escapes, what is adopted is a verdict (None or text), a check answered from an
adopted verdict starts no child, and the file written back after the next verdict is one a restart reads.
"""

from __future__ import annotations

import json
from functools import cache

from agent.errors import ModelError
from agent.models import probe as probe_module
from agent.models.accelerators import Runtime, load_runtime
from agent.models.probe import (
    MAX_SAVED_VERDICTS,
    PROBE_FILE,
    ChildOutcome,
    EarlyProbe,
    ModelProbe,
    bundled_sha256,
    expect_early,
    finish_early,
    probe_key,
    probes_spawned,
)

# The content probed next, as an early probe would record it.
_NEXT_DIGEST = "5" * 64
# Checks per input: each adopted verdict answers one without a child; a few show it.
_CHECKS = 8


@cache
def _runtime() -> Runtime:
    return load_runtime()


def _forget_verdicts() -> None:
    # Verdicts are shared by the whole process: each input starts as a freshly started agent would.
    probe_module._verdicts.clear()
    probe_module._early.clear()


def target_probe_state(data: bytes) -> None:
    """Any model-probes.json: adopted verdicts are None or text, answer checks without a child, and the file
    written back after a new verdict holds it and reads again."""
    from tests.fuzz.targets import _workdir  # the targets' shared scratch folder

    folder = _workdir() / "probe-state"
    folder.mkdir(exist_ok=True)
    _forget_verdicts()
    probe = ModelProbe(_runtime(), state_dir=folder)
    key = probe_key(probe.runtime, probe.allowance_bytes)
    (folder / PROBE_FILE).write_bytes(data.replace(b"@KEY@", json.dumps(key)[1:-1].encode()))
    spawned = probes_spawned()
    pending = expect_early(key, folder, _NEXT_DIGEST)  # reads the file
    adopted = {digest: verdict for (held, digest), verdict in probe_module._verdicts.items() if held == key}
    assert all(verdict is None or isinstance(verdict, str) for verdict in adopted.values()), adopted
    # An empty digest is no digest: check() hashes the content instead (a child, for a verdict not saved).
    for digest, verdict in [(digest, verdict) for digest, verdict in adopted.items() if digest][:_CHECKS]:
        try:
            probe.check(b"", "fuzzed.tflite", digest)
        except ModelError:
            assert verdict is not None, digest
        else:
            assert verdict is None or digest in bundled_sha256(), (digest, verdict)
    assert probes_spawned() == spawned, "a check answered from the state file started a child"
    finish_early(key, folder, pending or EarlyProbe(), ChildOutcome(_NEXT_DIGEST, None, True))
    saved = json.loads((folder / PROBE_FILE).read_text(encoding="utf-8"))
    assert saved["runtime"] == key and len(saved["verdicts"]) <= MAX_SAVED_VERDICTS, len(saved["verdicts"])
    if pending is not None:  # the next verdict was new: it is the newest, never the one forgotten
        assert saved["verdicts"][_NEXT_DIGEST] is None
    _forget_verdicts()
    assert expect_early(key, folder, _NEXT_DIGEST) is None, "the file written back did not read again"
    _forget_verdicts()

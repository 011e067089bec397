"""A model file's first opening, in a child process: a file that crashes the runtime is refused, not loaded.

LiteRT and tflite-runtime segfault on some damaged ``.tflite`` files (in the Interpreter's constructor, or
only in ``allocate_tensors``: tests/fixtures/crashing_models.py), and a segfault cannot be caught in-process:
one bad file named in a manifest would end the agent and every model it serves. So before the agent (or
``edge-agent models add``) first opens a file with the runtime, :class:`ModelProbe` has a child
(:mod:`agent.models.probe_child`, the same Python) open it the same way (construct, allocate, one invoke on
zero inputs) under a timeout and an address-space limit. A child killed by a signal, a timeout, an error
allocating the tensors or running them (the memory limit reached among others), or a child that could not run
at all is a :class:`~agent.errors.ModelError`; the model is refused like any other unusable one and everything
else goes on being served. Two clean errors pass: the Interpreter refusing to build (the agent's own reading
meets the same error and reports it as before) and an op the runtime lacks (an Edge TPU model's custom op,
which its delegate provides in the agent).

A verdict depends only on the file's content, the runtime and the memory allowed, so it is kept by sha256 for
the life of the process (shared by every probe of the same runtime and allowance) and, with a ``state_dir``,
in ``model-probes.json`` there: a file is probed once per content, not once per load, reload or restart. The
bundled models (their sha256 are in the package's own manifest) are never probed: a default start spawns
nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from functools import cache
from pathlib import Path

from agent.config import BUNDLED_MODELS_DIR
from agent.errors import ModelError
from agent.models.accelerators import Runtime
from agent.models.probe_child import STAGES

log = logging.getLogger(__name__)

PROBE_FILE = "model-probes.json"
# A large model on a Pi 3 loads and runs once in a few seconds; a damaged one that loops is stopped here.
PROBE_TIMEOUT_S = 60.0
# Address space the child may add to what it uses once the runtime is imported (plus twice the file's size), when
# the agent has no process soft limit to give it instead: room for a real model's packed weights and tensor arena;
# a damaged file that asks for gigabytes fails there instead of meeting the OOM killer here.
PROBE_ALLOWANCE_BYTES = 512 * 1024 * 1024
# What a runtime says of a custom op it does not have; a delegate supplies it when the agent loads the model.
_UNRESOLVED_CUSTOM_OP = "unresolved custom op"
# Verdicts kept in the state file, the oldest forgotten first (a device holds tens of models, not thousands).
MAX_SAVED_VERDICTS = 1024

# (probe_key, sha256) -> None (passed) or what the file did, e.g. "crashed the interpreter in a probe (...)";
# shared by every ModelProbe in the process.
_verdicts: dict[tuple[str, str], str | None] = {}
# Held only to look a verdict up or record one: a load whose file is known never waits for another file's probe.
_verdicts_lock = threading.Lock()
# One probe at a time: a probe is a whole Python with the runtime, too much to run several of on a small board.
_probe_lock = threading.Lock()
_spawned = 0


def probes_spawned() -> int:
    """Child processes started by every probe in this process so far (cached verdicts start none)."""
    return _spawned


@cache
def bundled_sha256() -> frozenset[str]:
    """The sha256 of every model the package ships: known files that need no probe."""
    manifest = json.loads((BUNDLED_MODELS_DIR / "manifest.json").read_text(encoding="utf-8"))
    return frozenset(str(entry["sha256"]) for entry in manifest["models"])


def allowance_for(process_limit_mb: int | None) -> int:
    """The address space a probe child may add: the agent's process soft limit, else PROBE_ALLOWANCE_BYTES (a model
    that cannot allocate within the soft limit could not be served anyway)."""
    return process_limit_mb * 1024 * 1024 if process_limit_mb is not None else PROBE_ALLOWANCE_BYTES


def probe_key(runtime: Runtime, allowance_bytes: int) -> str:
    """What a verdict holds for: the Interpreter's module, the version of its package and the memory allowed."""
    module = runtime.interpreter.__module__
    package = sys.modules.get(module.partition(".")[0])
    return f"{module} {getattr(package, '__version__', '?')}, {allowance_bytes} bytes"


class ModelProbe:
    """Opens model files with ``runtime`` in a child process before the agent opens them in its own."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        state_dir: Path | None = None,
        timeout_s: float = PROBE_TIMEOUT_S,
        allowance_bytes: int = PROBE_ALLOWANCE_BYTES,
    ) -> None:
        self.runtime = runtime
        self.state_dir = state_dir
        self.timeout_s = timeout_s
        self.allowance_bytes = allowance_bytes
        self._key = probe_key(runtime, allowance_bytes)
        self._state_read = False

    def check(self, content: bytes, name: str, sha256: str | None = None) -> None:
        """Return if ``content`` (the file ``name``, whose sha256 the caller may know) is safe to open with the
        runtime; :class:`ModelError` saying why not if it crashed, hung or could not be probed."""
        digest = sha256 or hashlib.sha256(content).hexdigest()
        if digest in bundled_sha256():
            return
        verdict = self._known(digest)
        if verdict is False:
            with _probe_lock:
                verdict = self._known(digest)  # another thread may have probed the same content meanwhile
                if verdict is False:
                    verdict = self._probe(content, name, digest)
        if verdict is not None:
            raise ModelError(f"model file {name} {verdict}; not loaded")

    def _known(self, digest: str) -> str | None | bool:
        """The verdict on ``digest`` from memory or the state file; False if there is none."""
        with _verdicts_lock:
            if not self._state_read:
                self._state_read = True
                for saved, verdict in self._read_state().items():
                    _verdicts.setdefault((self._key, saved), verdict)
            return _verdicts.get((self._key, digest), False)

    def _probe(self, content: bytes, name: str, digest: str) -> str | None:
        """Run the child on ``content``: the verdict (None: passed), remembered unless it may not hold next time."""
        global _spawned
        _spawned += 1
        started = time.monotonic()
        command = [sys.executable, "-m", "agent.models.probe_child", self.runtime.interpreter.__module__,
                   str(self.allowance_bytes + 2 * len(content))]  # fmt: skip
        # One numpy/OpenBLAS thread: its pool would reserve address space that counts against the limit.
        environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        try:
            child = subprocess.run(
                command, input=content, capture_output=True, timeout=self.timeout_s, env=environment, check=False
            )
        except subprocess.TimeoutExpired as exc:
            stage = _stage_reached((exc.stdout or b"").decode("utf-8", "replace"))
            # Not remembered: a loaded machine may be what made it slow.
            return f"did not load within {self.timeout_s:g} s in a probe (still {stage})"
        except OSError as exc:
            return f"could not be probed ({exc})"
        elapsed_ms = (time.monotonic() - started) * 1000
        output = child.stdout.decode("utf-8", "replace")
        remembered = True
        if child.returncode < 0:
            verdict: str | None = (
                f"crashed the interpreter in a probe ({_signal_name(-child.returncode)}, while {_stage_reached(output)})"
            )
        elif child.returncode > 0:
            # The child itself failed (no runtime, no memory to start): nothing is known about the file.
            remembered = False
            problem = child.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
            verdict = f"could not be probed (exit status {child.returncode}: {problem[0]})"
        else:
            verdict = self._refusal(output, len(content))
        # A refusal is logged by whoever refuses the model, with its id.
        if verdict is None:
            log.info("model file %s passed a probe in %.0f ms: %s", name, elapsed_ms, _outcome(output))
        if remembered:
            with _verdicts_lock:
                _verdicts[(self._key, digest)] = verdict
                mine = [(saved, known) for (key, saved), known in _verdicts.items() if key == self._key]
            self._save(mine)
        return verdict

    def _refusal(self, output: str, size: int) -> str | None:
        """Why a child that exited normally refuses the file: an error allocating or running its tensors."""
        error = _outcome(output)
        if error.startswith("error constructing") or _UNRESOLVED_CUSTOM_OP in error.lower():
            return None
        if error.startswith("error "):
            limit_mb = (self.allowance_bytes + 2 * size) / (1024 * 1024)
            return f"failed in a probe ({error.removeprefix('error ')}; allowed {limit_mb:.0f} MB beyond the runtime)"
        return None

    # ---- the state file ------------------------------------------------------------------------------

    def _read_state(self) -> dict[str, str | None]:
        if self.state_dir is None:
            return {}
        try:
            saved = json.loads((self.state_dir / PROBE_FILE).read_text(encoding="utf-8"))
            if saved.get("runtime") != self._key:
                return {}  # another runtime (or version, or memory allowance) may fail on other files
            return {str(digest): None if verdict is None else str(verdict) for digest, verdict in saved["verdicts"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s unreadable (%s): model files will be probed again", self.state_dir / PROBE_FILE, exc)
            return {}

    def _save(self, mine: list[tuple[str, str | None]]) -> None:
        """Write this runtime's verdicts to the state file (under the probe lock; best effort: a failure only
        costs probes later)."""
        if self.state_dir is None:
            return
        document = {"runtime": self._key, "verdicts": dict(mine[-MAX_SAVED_VERDICTS:])}
        path = self.state_dir / PROBE_FILE
        temporary = path.with_name(f".{PROBE_FILE}.tmp")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("cannot save model probe results in %s: %s", path, exc)


def _stage_reached(output: str) -> str:
    """What the child was doing when it stopped, from the stages it reported."""
    reached = [line for line in output.splitlines() if line in STAGES]
    if not reached:
        return "constructing the interpreter"
    if reached[-1] == STAGES[0]:
        return "allocating tensors"
    if reached[-1] == STAGES[1]:
        return "invoking on zero inputs"
    return "exiting"


def _outcome(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error ")]
    return errors[0] if errors else "loaded and ran once"


def _signal_name(number: int) -> str:
    try:
        return f"signal {number}, {signal.Signals(number).name}"
    except ValueError:
        return f"signal {number}"

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

A start need not wait for its probes one after the other: :func:`probe_early` starts them, before the agent has
even imported its own modules, for every file of the manifest whose verdict is not known, on a thread of their
own (one child at a time), and :meth:`ModelProbe.check` waits for that result instead of starting a child.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, TYPE_CHECKING

from agent.config import BUNDLED_MODELS_DIR, INTERPRETER_MODULES, RuntimeChoice
from agent.errors import ModelError
from agent.models.probe_child import STAGES

if TYPE_CHECKING:  # imported by the caller: this module is imported before the runtime and numpy (probe_early)
    from agent.models.accelerators import Runtime

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
# Held only to look a verdict up or record (and save) one: a load whose file is known never waits for a probe.
_verdicts_lock = threading.Lock()
# One probe at a time on demand, and one more early (probe_early): a probe is a whole Python with the runtime, too
# much to run several of on a small board.
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
    return module_key(runtime.interpreter.__module__, allowance_bytes)


def module_key(module: str, allowance_bytes: int) -> str:
    """:func:`probe_key` for the Interpreter's module by name (its package, not the module, is imported: cheap)."""
    package = importlib.import_module(module.partition(".")[0])
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
            verdict = _await_early((self._key, digest), self.timeout_s)
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
                _adopt_saved(self._key, self.state_dir)
            return _verdicts.get((self._key, digest), False)

    def _probe(self, content: bytes, name: str, digest: str) -> str | None:
        """Run the child on ``content``: the verdict (None: passed), remembered unless it may not hold next time."""
        started = time.monotonic()
        outcome = run_child(self.runtime.interpreter.__module__, self.allowance_bytes, self.timeout_s, content)
        if outcome.verdict is None:
            log.info("model file %s passed a probe in %.0f ms: %s", name, (time.monotonic() - started) * 1000, outcome.passed)
        if outcome.remembered:
            _record(self._key, self.state_dir, digest, outcome.verdict)
        return outcome.verdict


# ---- what every probe shares: running a child, the verdicts, probes started early --------------------------


@dataclass(frozen=True)
class ChildOutcome:
    """What a probe child found: the sha256 of the content it read (None if it said nothing) and the verdict."""

    digest: str | None
    verdict: str | None
    remembered: bool  # False: the verdict may not hold next time (a timeout, a child that could not run)
    passed: str = ""  # for a file that passed: what the runtime did with it


def run_child(module: str, allowance_bytes: int, timeout_s: float, content: bytes | IO[bytes]) -> ChildOutcome:
    """Probe ``content`` (bytes, or a file opened for reading, handed to the child as its stdin) with ``module``."""
    global _spawned
    with _verdicts_lock:  # counted from the early thread and on demand at once
        _spawned += 1
    command = [sys.executable, "-m", "agent.models.probe_child", module, str(allowance_bytes)]
    # One numpy/OpenBLAS thread: its pool would reserve address space that counts against the limit.
    environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    given = content if isinstance(content, bytes) else None
    stdin = subprocess.PIPE if given is not None else content
    try:
        with subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment) as child:
            try:
                out, err = child.communicate(given, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                out, _ = child.communicate()
                # Not remembered: a loaded machine may be what made it slow.
                stage = _stage_reached(out.decode("utf-8", "replace"))
                return ChildOutcome(_digest(out), f"did not load within {timeout_s:g} s in a probe (still {stage})", False)
    except OSError as exc:
        return ChildOutcome(None, f"could not be probed ({exc})", False)
    output = out.decode("utf-8", "replace")
    if child.returncode < 0:
        signalled = f"{_signal_name(-child.returncode)}, while {_stage_reached(output)}"
        return ChildOutcome(_digest(out), f"crashed the interpreter in a probe ({signalled})", True)
    if child.returncode > 0:
        # The child itself failed (no runtime, no memory to start): nothing is known about the file.
        problem = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        return ChildOutcome(_digest(out), f"could not be probed (exit status {child.returncode}: {problem[0]})", False)
    error = _outcome(output)
    if error.startswith("error ") and not error.startswith("error constructing") and _UNRESOLVED_CUSTOM_OP not in error.lower():
        # An error allocating or running the tensors (the memory limit among others) refuses the file.
        limit_mb = (allowance_bytes + 2 * _size(output)) / (1024 * 1024)
        refusal = f"failed in a probe ({error.removeprefix('error ')}; allowed {limit_mb:.0f} MB beyond the runtime)"
        return ChildOutcome(_digest(out), refusal, True)
    return ChildOutcome(_digest(out), None, True, error)


def _record(key: str, state_dir: Path | None, digest: str, verdict: str | None) -> None:
    """Remember a verdict in memory and in ``state_dir``'s file (best effort: a failure only costs probes later)."""
    with _verdicts_lock:
        _verdicts[(key, digest)] = verdict
        mine = {saved: known for (held, saved), known in _verdicts.items() if held == key}
        if state_dir is None:
            return
        document = {"runtime": key, "verdicts": dict(list(mine.items())[-MAX_SAVED_VERDICTS:])}
        path = state_dir / PROBE_FILE
        temporary = path.with_name(f".{PROBE_FILE}.tmp")
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("cannot save model probe results in %s: %s", path, exc)


def _adopt_saved(key: str, state_dir: Path | None) -> None:
    """Take ``state_dir``'s verdicts reached under ``key`` into memory (under the verdicts lock)."""
    if state_dir is None:
        return
    try:
        saved = json.loads((state_dir / PROBE_FILE).read_text(encoding="utf-8"))
        if saved.get("runtime") != key:
            return  # another runtime (or version, or memory allowance) may fail on other files
        for digest, verdict in saved["verdicts"].items():
            _verdicts.setdefault((key, str(digest)), None if verdict is None else str(verdict))
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        log.warning("%s unreadable (%s): model files will be probed again", state_dir / PROBE_FILE, exc)


@dataclass
class EarlyProbe:
    """A probe started before the file is needed (:mod:`agent.models.probe_early`); ``done`` once ``outcome`` is in."""

    done: threading.Event = field(default_factory=threading.Event)
    outcome: ChildOutcome | None = None


# (probe_key, declared sha256) -> the probe started early for it, until a check takes its outcome.
_early: dict[tuple[str, str], EarlyProbe] = {}


def expect_early(key: str, state_dir: Path | None, digest: str) -> EarlyProbe | None:
    """Register a probe about to start early for ``digest``; None if its verdict is known or one is registered."""
    with _verdicts_lock:
        _adopt_saved(key, state_dir)
        if (key, digest) in _verdicts or (key, digest) in _early or digest in bundled_sha256():
            return None
        pending = _early[(key, digest)] = EarlyProbe()
        return pending


def finish_early(key: str, state_dir: Path | None, pending: EarlyProbe, outcome: ChildOutcome | None) -> None:
    """Hand an early probe's outcome (None: the file could not be opened) to whoever waits for it, remembering its
    verdict as any probe's."""
    if outcome is not None and outcome.remembered and outcome.digest is not None:
        _record(key, state_dir, outcome.digest, outcome.verdict)
    pending.outcome = outcome
    pending.done.set()


def _await_early(held: tuple[str, str], timeout_s: float) -> str | None | bool:
    """The verdict of the probe started early for ``held`` (waiting for it); False if there is none, it found
    other content under that name (the file changed), or it never finished."""
    with _verdicts_lock:
        pending = _early.get(held)
    # The early child has its own timeout; beyond it (and a margin for its queue) this check probes itself.
    if pending is None or not pending.done.wait(2 * timeout_s + 5):
        return False
    with _verdicts_lock:
        _early.pop(held, None)  # taken once: a verdict not remembered (a timeout) holds this time only
    outcome = pending.outcome
    if outcome is None or outcome.digest != held[1]:
        return False
    return outcome.verdict


def interpreter_module(choice: RuntimeChoice) -> str | None:
    """The Interpreter module ``load_runtime(choice)`` will most likely import, found without importing it."""
    for name in INTERPRETER_MODULES if choice == "auto" else [choice]:
        if importlib.util.find_spec(INTERPRETER_MODULES[name].partition(".")[0]) is not None:
            return INTERPRETER_MODULES[name]
    return None


def _digest(out: bytes) -> str | None:
    lines = [line for line in out.decode("utf-8", "replace").splitlines() if line.startswith("sha256 ")]
    return lines[0].removeprefix("sha256 ") if lines else None


def _size(output: str) -> int:
    lines = [line for line in output.splitlines() if line.startswith("size ")]
    return int(lines[0].removeprefix("size ")) if lines else 0


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

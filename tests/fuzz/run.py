"""Run fuzz targets under atheris.

``python -m tests.fuzz.run TARGET [libFuzzer flags] [corpus dirs]`` runs one target: ``atheris.Fuzz()`` never
returns (libFuzzer exits the process), so ``make fuzz`` starts a process per target. libFuzzer flags
(``-runs=N``, ``-max_total_time=S``, ``-timeout=S``, ``-rss_limit_mb=MB``) pass through; a crashing input is
written to ``-artifact_prefix`` (default: the current directory) as ``crash-<sha1>``.

``python -m tests.fuzz.run --each OUT_DIR CORPUS_ROOT [libFuzzer flags]`` runs every target, each in a child
forked once the instrumented modules are imported (two at a time), as tests/test_fuzz_corpus.py does: the
instrumented import costs each process about two seconds of CPU, most of what a short run costs. A target's
child fuzzes ``OUT_DIR/TARGET/corpus`` (a scratch folder it adds to) seeded from ``CORPUS_ROOT/TARGET``, writes
its crashes to ``OUT_DIR/TARGET/``, its output to ``OUT_DIR/TARGET/log`` and its exit status to
``OUT_DIR/TARGET/status``.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["agent"]):
    from tests.fuzz.targets import TARGETS

_CHILDREN_AT_ONCE = 2


def _fuzz(name: str, argv: list[str]) -> None:
    """Fuzz target ``name`` with libFuzzer arguments ``argv``; exits the process."""
    logging.disable(logging.CRITICAL)  # refusals log by design; a fuzzer's millions of lines help nobody
    atheris.Setup([sys.argv[0], *argv], TARGETS[name])
    atheris.Fuzz()


def _start_child(name: str, out: Path, corpus_root: Path, flags: list[str]) -> int:
    folder = out / name
    (folder / "corpus").mkdir(parents=True)
    pid = os.fork()
    if pid:
        return pid
    log = os.open(folder / "log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        _fuzz(name, [*flags, f"-artifact_prefix={folder}/", str(folder / "corpus"), str(corpus_root / name)])
    except SystemExit:
        # How atheris ends on a finding: the interpreter's exit runs libFuzzer's exit handler, which writes the
        # input to the artifact prefix and sets the exit status (os._exit would skip it).
        raise
    except BaseException:
        traceback.print_exc()
    os._exit(70)  # the fuzzer could not even start: libFuzzer ends the child itself otherwise


def run_each(out: Path, corpus_root: Path, flags: list[str]) -> None:
    """Fuzz every target in a forked child, two at a time; see the module docstring."""
    running: dict[int, str] = {}
    pending = sorted(TARGETS)
    while pending or running:
        while pending and len(running) < _CHILDREN_AT_ONCE:
            name = pending.pop(0)
            running[_start_child(name, out, corpus_root, flags)] = name
        pid, status = os.wait()
        (out / running.pop(pid) / "status").write_text(str(os.waitstatus_to_exitcode(status)))


def main() -> None:
    if len(sys.argv) >= 4 and sys.argv[1] == "--each":
        run_each(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
        return
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(
            "usage: python -m tests.fuzz.run TARGET [libFuzzer flags] [corpus dirs]\n"
            f"   or: python -m tests.fuzz.run --each OUT_DIR CORPUS_ROOT [libFuzzer flags]; targets: {', '.join(TARGETS)}"
        )
    _fuzz(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
    main()

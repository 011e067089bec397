"""Run one fuzz target under atheris: ``python -m tests.fuzz.run TARGET [libFuzzer flags] [corpus dirs]``.

``atheris.Fuzz()`` never returns (libFuzzer exits the process), so every run is a subprocess of its own;
``make fuzz`` and tests/test_fuzz_corpus.py start it like that. libFuzzer flags (``-runs=N``,
``-max_total_time=S``, ``-timeout=S``, ``-rss_limit_mb=MB``) pass through; a crashing input is written to
``-artifact_prefix`` (default: the current directory) as ``crash-<sha1>``.
"""

from __future__ import annotations

import logging
import sys

import atheris

with atheris.instrument_imports(include=["agent"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    logging.disable(logging.CRITICAL)  # refusals log by design; a fuzzer's millions of lines help nobody
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.run TARGET [libFuzzer flags] [corpus dirs]; targets: {', '.join(TARGETS)}")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

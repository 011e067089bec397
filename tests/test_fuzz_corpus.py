"""The fuzz corpus as regression tests: every committed input replays through its target's harness (no
atheris needed), and where atheris is installed each target also runs a bounded number of new inputs.

Findings live in tests/fuzz/corpus/<target>/ as ``crash-*`` files beside the ``seed-*`` inputs; see
tests/fuzz/targets.py for what each target asserts and ``make fuzz`` for long runs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).parent / "fuzz" / "corpus"
REPO_ROOT = Path(__file__).resolve().parents[1]
NEW_INPUTS_PER_TARGET = 300


def _corpus(target: str) -> list[Path]:
    return sorted((CORPUS / target).iterdir())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_replays(target: str) -> None:
    files = _corpus(target)
    assert files, f"no corpus for {target}"
    for path in files:
        try:
            TARGETS[target](path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{path.relative_to(REPO_ROOT)}: {exc!r}") from exc


def test_every_corpus_folder_has_a_target() -> None:
    assert {folder.name for folder in CORPUS.iterdir()} == set(TARGETS)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every target's bounded run, each in a child of one process (see tests/fuzz/run.py ``--each``): a
    folder per target with its exit ``status``, its ``log`` and what it found."""
    out = tmp_path_factory.mktemp("fuzz")
    # Scratch copies: a run adds what it finds to its first corpus folder, and the committed one stays as it is.
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", "--each", str(out), str(CORPUS), f"-runs={NEW_INPUTS_PER_TARGET}",
         "-timeout=60"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed for this Python")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_new_inputs(target: str, fuzzed: Path) -> None:
    status = (fuzzed / target / "status").read_text()
    assert status == "0", f"exit status {status}:\n" + (fuzzed / target / "log").read_text()[-4000:]

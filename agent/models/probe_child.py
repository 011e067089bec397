"""The child process of a model probe (:mod:`agent.models.probe`): ``python -m agent.models.probe_child MODULE
ALLOWANCE``, the model file's bytes on stdin (a pipe, or the file itself).

It opens the model with the runtime's Interpreter (``MODULE``, e.g. ``ai_edge_litert.interpreter``) as the
agent would: construct, allocate the tensors, then one invoke on zero inputs. Each stage reached is written
to stdout as one line before the next begins (after ``sha256 <hex>`` and ``size <bytes>`` of what it read: a parent that handed
over the file itself learns what content the verdict is for), so a parent that sees the child die of a signal knows in which
stage the runtime crashed. An error the runtime raises cleanly is written as ``error <stage>: <message>`` and
the child exits 0: the agent's own load meets the same error and reports it without crashing.

Only the standard library, numpy and the runtime are imported: every probe pays for this module's imports.
Memory is limited once those imports are done (``ALLOWANCE`` bytes of address space beyond what the child
uses by then, plus twice the file's size), so a damaged file that asks for an absurd tensor arena fails here, not in the agent.
"""

from __future__ import annotations

import hashlib
import importlib
import resource
import sys
from typing import Any

STAGES = ("constructed", "allocated", "invoked")


def _limit_address_space(allowance_bytes: int) -> None:
    """Allow ``allowance_bytes`` of address space beyond what the child has mapped now (Linux; elsewhere no limit)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            mapped = int(statm.read().split()[0]) * resource.getpagesize()
    except OSError:
        return
    resource.setrlimit(resource.RLIMIT_AS, (mapped + allowance_bytes, mapped + allowance_bytes))


def _report(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _zero_inputs(interpreter: Any) -> None:
    import numpy as np

    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], dtype=detail["dtype"]))


def probe(module_name: str, allowance_bytes: int, content: bytes) -> None:
    """Run the stages on ``content``, reporting each on stdout; a clean runtime error ends the run early."""
    # A crash here is the expected outcome for a damaged file: no core dump (an SD card's writes, a crash
    # reporter's time) for it.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _report(f"sha256 {hashlib.sha256(content).hexdigest()}")
    _report(f"size {len(content)}")
    interpreter_class = importlib.import_module(module_name).Interpreter
    _limit_address_space(allowance_bytes + 2 * len(content))
    stage = "constructing"
    try:
        interpreter = interpreter_class(model_content=content, num_threads=1)
        _report(STAGES[0])
        stage = "allocating tensors"
        interpreter.allocate_tensors()
        _report(STAGES[1])
        stage = "invoking on zero inputs"
        _zero_inputs(interpreter)
        interpreter.invoke()
        _report(STAGES[2])
    except (ValueError, RuntimeError, TypeError, MemoryError) as exc:
        message = " ".join(str(exc).split())[:300]
        _report(f"error {stage}: {type(exc).__name__}: {message}")


def main(argv: list[str]) -> int:
    """Entry point: ``MODULE ALLOWANCE`` in ``argv``, the model on stdin."""
    module_name, allowance = argv
    probe(module_name, int(allowance), sys.stdin.buffer.read())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

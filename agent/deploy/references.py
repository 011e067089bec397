"""The reference cases of a bundle run on a warmed version and compared with what the publisher measured.

Inputs go in as an ``infer`` request carries them (real values, quantized for a quantized input) and outputs come
out as a client gets them (dequantized), so the publisher's figures are comparable whatever the tensor types.
Each expected output is compared element by element within the case's tolerance; the first mismatch is named
with its output, the worst element, both values and the difference. A stateful model runs each case from a
fresh state of its own, as a new client stream would.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.deploy.staged import ReferenceCase
from agent.errors import RequestError
from agent.models.inference import LoadedModel, decode_output, prepare_input

# A reference input is the publisher's, checked by signature: no client limit on its size applies.
REFERENCE_MAX_ELEMENTS = 1 << 30


def reference_mismatch(loaded: LoadedModel, case: ReferenceCase) -> str | None:
    """Why ``loaded`` does not answer ``case`` as the publisher measured (within its tolerance), or None."""
    unknown = sorted(set(case.inputs) - {info.name for info in loaded.inputs})
    missing = [info.name for info in loaded.inputs if info.name not in case.inputs]
    if unknown or missing:
        return f"inputs do not fit the model: unknown {unknown}, missing {missing}"
    try:
        feeds = {
            info.name: prepare_input(info, case.inputs[info.name], raw=False, max_elements=REFERENCE_MAX_ELEMENTS)
            for info in loaded.inputs
        }
        outputs = _run_once(loaded, feeds)
    except RequestError as exc:
        return f"{exc.name}: {exc.message}"
    if outputs is None:
        return "no memory for an interpreter of its own to run the reference case on (a stateful model)"
    decoded = {info.name: decode_output(info, outputs[info.name], raw=False) for info in loaded.outputs}
    for name, expected in case.expected.items():
        if name not in decoded:
            return f"the model has no output {name!r} (its outputs: {', '.join(decoded)})"
        problem = _difference(name, np.asarray(decoded[name], dtype=np.float64), expected, case.tolerance)
        if problem is not None:
            return problem
    return None


def _run_once(loaded: LoadedModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    if not loaded.entry.stateful:
        return loaded.run(feeds)
    state = loaded.open_state()
    if state is None:
        return None
    try:
        return loaded.run_state(state, feeds)
    finally:
        loaded.close_state(state)


def _difference(name: str, actual: np.ndarray, expected: Any, tolerance: float) -> str | None:
    try:
        wanted = np.asarray(expected, dtype=np.float64)
    except (TypeError, ValueError):
        return f"output {name!r}: the expected value is not a (nested) list of numbers"
    if wanted.size != actual.size:
        return f"output {name!r} has shape {list(actual.shape)}, the reference expects {list(wanted.shape)}"
    wanted = wanted.reshape(actual.shape)
    both_nan = np.isnan(actual) & np.isnan(wanted)
    with np.errstate(invalid="ignore"):
        difference = np.where(both_nan, 0.0, np.abs(actual - wanted))
    difference = np.nan_to_num(difference, nan=np.inf)
    if not difference.size or float(difference.max()) <= tolerance:
        return None
    worst = np.unravel_index(int(np.argmax(difference)), difference.shape)
    return (
        f"output {name!r} differs by {float(difference[worst]):.6g} at {list(map(int, worst))} "
        f"(expected {float(wanted[worst]):.6g}, got {float(actual[worst]):.6g}; tolerance {tolerance:g})"
    )

"""TFLite inference: models loaded, run, and their tensors converted from and to the wire's forms.

A :class:`LoadedModel` holds a verified model file, its tensor signature and a small pool of interpreters
(or, on the GPU, compiled models: :mod:`agent.models.accelerators`, with this module the only importer of
LiteRT) whose memory is measured as each is created (:mod:`agent.observe.memory`).
"""

from __future__ import annotations

import binascii
import math
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import pybase64

from agent.errors import InferenceFailed, InvalidParams, ModelUnavailable
from agent.models.accelerators import CPU, Accelerator, AcceleratorUnavailable, Runtime, create_runner
from agent.models.catalog import ModelEntry
from agent.observe.memory import measured_growth

_B64_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("?"),
}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a model: the manifest's name, the interpreter's index, type and quantization."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and self.dtype.kind in "iu"

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.name}
        if self.quantized:
            info["quantization"] = {"scale": self.scale, "zero_point": self.zero_point}
        return info


def _tensor_infos(details: list[dict[str, Any]], names: list[str]) -> list[TensorInfo]:
    infos = []
    for position, detail in enumerate(details):
        scale, zero_point = detail.get("quantization", (0.0, 0))
        name = names[position] if position < len(names) else str(detail["name"])
        infos.append(
            TensorInfo(
                name=name,
                index=int(detail["index"]),
                shape=tuple(int(dim) for dim in detail["shape"]),
                dtype=np.dtype(detail["dtype"]),
                scale=float(scale),
                zero_point=int(zero_point),
            )
        )
    return infos


class LoadedModel:
    """A model ready to run: verified bytes, tensor signature and a pool of interpreters.

    An interpreter must never be used by two threads at once (that raises or silently returns wrong
    results), but it may pass from thread to thread: each run checks one out of the pool and returns it.
    Each interpreter has its own tensor arena (and, with XNNPACK, its own packed copy of float weights),
    so the pool grows only up to ``max_interpreters`` concurrent runs of this model, and only while
    ``admit_growth(estimated_bytes)`` agrees. Every interpreter's memory is measured as it is created:
    ``memory_bytes`` is what the model really holds. ``invoke()`` releases the GIL, so runs on different
    interpreters proceed in parallel; ``gate`` (shared by all models) bounds concurrent runs process-wide.

    On a ``gpu`` or delegate ``accelerator`` the pool holds accelerated interpreters, measured the same way.
    If the accelerator is missing or refuses the model, the model runs on CPU and ``accelerator_problem``
    says why, or, with ``accelerator_required``, it does not load at all.
    """

    def __init__(
        self,
        entry: ModelEntry,
        content: bytes,
        num_threads: int = 1,
        *,
        runtime: Runtime,
        max_interpreters: int = 1,
        admit_growth: Callable[[int], bool] | None = None,
        gate: AbstractContextManager[Any] | None = None,
        accelerator: Accelerator = CPU,
        accelerator_required: bool = False,
    ) -> None:
        self.entry = entry
        self.num_threads = num_threads
        self.runtime = runtime
        self.accelerator = accelerator
        self.accelerator_problem: str | None = None
        self.max_interpreters = max_interpreters
        self._content = content
        self._admit_growth = admit_growth
        self._gate = gate if gate is not None else nullcontext()
        self._cond = threading.Condition()
        self._idle: list[Any] = []
        self._costs: dict[int, int] = {}  # id(interpreter) -> bytes measured when it was created
        self._growing = False
        self._closed = False
        try:
            probe = self._first_interpreter(accelerator_required)
        except (ValueError, RuntimeError) as exc:
            because = f" (on CPU, as {self.accelerator_problem})" if self.accelerator_problem else ""
            raise ModelUnavailable(f"model {entry.id!r} failed to load{because}: {exc}") from None
        assert probe is not None, "the first interpreter needs no admission"
        self.interpreter_bytes = self._costs[id(probe)]
        # What models/list, the status and /metrics report: cpu, gpu, gpu+cpu (ops the GPU cannot run stay
        # on XNNPACK) or delegate:<library>.
        partial = not getattr(probe, "fully_accelerated", True)
        self.accelerator_in_use = f"{self.accelerator.name}+cpu" if partial else self.accelerator.name
        self.inputs = _tensor_infos(probe.get_input_details(), [spec.name for spec in entry.inputs])
        self.outputs = _tensor_infos(probe.get_output_details(), [spec.name for spec in entry.outputs])
        self._inputs_by_name = {info.name: info for info in self.inputs}
        self._idle.append(probe)

    def _first_interpreter(self, required: bool) -> Any:
        if self.accelerator != CPU:
            try:
                return self._create_interpreter(admit=False)
            except AcceleratorUnavailable as exc:
                if required:
                    raise ModelUnavailable(f"model {self.entry.id!r} needs {self.accelerator.name}: {exc}") from None
                self.accelerator_problem, self.accelerator = str(exc), CPU
        return self._create_interpreter(admit=False)

    @property
    def size_bytes(self) -> int:
        return len(self._content)

    @property
    def memory_bytes(self) -> int:
        """The model file held in memory plus every live interpreter's measured cost."""
        with self._cond:
            return len(self._content) + sum(self._costs.values())

    @property
    def closed(self) -> bool:
        """Unloaded (:meth:`close`): runs in flight finish, nothing new starts on it."""
        with self._cond:
            return self._closed

    @property
    def interpreter_count(self) -> int:
        with self._cond:
            return len(self._costs)

    def _create_interpreter(self, *, admit: bool) -> Any | None:
        with measured_growth() as growth:
            # Asked inside the measurement lock: no other interpreter is being created meanwhile, so the
            # budget the answer is based on cannot change under it.
            if admit and self._admit_growth is not None and not self._admit_growth(self.interpreter_bytes):
                return None
            interpreter = create_runner(self.accelerator, self.runtime, self._content, self.num_threads)
        with self._cond:
            self._costs[id(interpreter)] = growth.bytes
        return interpreter

    def _checkout(self) -> Any:
        with self._cond:
            while True:
                if self._closed:
                    raise ModelUnavailable(f"model {self.entry.id!r} was unloaded")
                if self._idle:
                    return self._idle.pop()
                if not self._growing and len(self._costs) < self.max_interpreters:
                    self._growing = True
                    break
                self._cond.wait()
        interpreter = None
        try:
            interpreter = self._create_interpreter(admit=True)
        except (ValueError, RuntimeError, AcceleratorUnavailable) as exc:
            raise InferenceFailed(f"model {self.entry.id!r}: could not create another interpreter: {exc}") from None
        finally:
            with self._cond:
                self._growing = False
                self._cond.notify_all()
        if interpreter is not None:
            return interpreter
        with self._cond:  # no memory for another interpreter: wait for one of the existing ones
            while not self._idle:
                if self._closed:
                    raise ModelUnavailable(f"model {self.entry.id!r} was unloaded")
                self._cond.wait()
            return self._idle.pop()

    def _checkin(self, interpreter: Any) -> None:
        with self._cond:
            if self._closed:
                del self._costs[id(interpreter)]
            else:
                self._idle.append(interpreter)
            self._cond.notify()

    def shrink(self, keep: int = 1) -> None:
        """Drop idle interpreters beyond ``keep`` (the memory returns once the caller trims the heap)."""
        with self._cond:
            while self._idle and len(self._costs) > keep:
                del self._costs[id(self._idle.pop())]

    def close(self) -> None:
        """Drop every interpreter and the model bytes; runs still in flight finish on what they hold."""
        with self._cond:
            self._closed = True
            for interpreter in self._idle:
                del self._costs[id(interpreter)]
            self._idle.clear()
            self._content = b""
            self._cond.notify_all()

    def input_info(self, name: str) -> TensorInfo:
        try:
            return self._inputs_by_name[name]
        except KeyError:
            expected = ", ".join(self._inputs_by_name)
            raise InvalidParams(f"model {self.entry.id!r} has no input {name!r}; its inputs: {expected}") from None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference on an interpreter from the pool; ``feeds`` must already match the input tensors."""
        with self._gate:
            interpreter = self._checkout()
            try:
                return self._invoke(interpreter, feeds)
            finally:
                self._checkin(interpreter)

    def open_state(self) -> Any | None:
        """A fresh interpreter of its own for one stream of a stateful model (never pooled: it holds that
        stream's state), counted in ``memory_bytes``; None if the memory budget has no room for it."""
        with self._cond:
            if self._closed:
                raise ModelUnavailable(f"model {self.entry.id!r} was unloaded")
        try:
            return self._create_interpreter(admit=True)
        except (ValueError, RuntimeError, AcceleratorUnavailable) as exc:
            raise InferenceFailed(f"model {self.entry.id!r}: could not create an interpreter: {exc}") from None

    def run_state(self, state: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference on a stream's own interpreter (:meth:`open_state`); one caller at a time."""
        with self._gate:
            return self._invoke(state, feeds)

    def close_state(self, state: Any) -> None:
        """Drop a stream's interpreter and its share of ``memory_bytes``."""
        with self._cond:
            self._costs.pop(id(state), None)

    def _invoke(self, interpreter: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            for info in self.inputs:
                interpreter.set_tensor(info.index, feeds[info.name])
            interpreter.invoke()
            # get_tensor copies, so the interpreter can be used again before the caller reads.
            return {info.name: interpreter.get_tensor(info.index) for info in self.outputs}
        except (ValueError, RuntimeError) as exc:
            raise InferenceFailed(f"model {self.entry.id!r} failed while running: {exc}") from None


def encode_b64_tensor(array: np.ndarray) -> dict[str, Any]:
    """The b64 tensor form (as accepted for inputs) of an output: little-endian bytes, dtype and shape.

    Large outputs (a face detector's 15k floats) cost ~50x less this way than as nested JSON lists;
    pybase64's SIMD codec is ~40x faster than the standard library's on such tensors.
    """
    little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {
        "b64": pybase64.b64encode(np.ascontiguousarray(little_endian).tobytes()).decode("ascii"),
        "dtype": array.dtype.name,
        "shape": list(array.shape),
    }


def _decode_b64_tensor(name: str, value: dict[str, Any]) -> np.ndarray:
    unknown = set(value) - {"b64", "dtype", "shape"}
    if unknown:
        raise InvalidParams(f"input {name!r}: unknown field(s) {sorted(unknown)} in a b64 tensor")
    dtype_name = value.get("dtype")
    dtype = _B64_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None  # a list is unhashable
    if dtype is None:
        raise InvalidParams(f"input {name!r}: dtype must be one of {sorted(_B64_DTYPES)}")
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
        raise InvalidParams(f"input {name!r}: shape must be a list of non-negative integers")
    try:
        raw = pybase64.b64decode(value.get("b64", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise InvalidParams(f"input {name!r}: b64 is not valid base64") from None
    expected = math.prod(shape) * dtype.itemsize  # exact: numpy's int64 product overflows on huge dimensions
    if len(raw) != expected:
        raise InvalidParams(f"input {name!r}: {len(raw)} bytes do not make shape {shape} of {dtype.name} ({expected} bytes)")
    try:
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    except ValueError:  # an empty tensor with a dimension beyond numpy's index range, or too many dimensions
        raise InvalidParams(f"input {name!r}: shape {shape} is not a shape numpy can hold") from None
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidParams(f"input {name!r}: b64 tensor holds NaN or infinite values")
    return array


def _as_numeric_array(name: str, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise InvalidParams(f"input {name!r}: lists must be rectangular (same length at each level)") from None
    if array.dtype.kind not in "iuf" or array.dtype == object:
        raise InvalidParams(f"input {name!r}: must be a (nested) list of numbers")
    return array


def prepare_input(info: TensorInfo, value: Any, *, raw: bool, max_elements: int) -> np.ndarray:
    """Turn a client's value (nested list or b64 tensor) into the exact array the input tensor takes.

    Real-valued input for a quantized tensor is quantized with the tensor's scale and zero point unless
    ``raw`` is set, in which case the values must already be integers in the tensor's range.
    """
    array = _decode_b64_tensor(info.name, value) if isinstance(value, dict) else _as_numeric_array(info.name, value)
    if array.size > max_elements:
        raise InvalidParams(f"input {info.name!r}: {array.size} elements exceed the limit of {max_elements}")
    if array.shape != info.shape:
        if array.shape == info.shape[1:] and info.shape[:1] == (1,):
            array = array.reshape(info.shape)
        else:
            raise InvalidParams(f"input {info.name!r}: shape {list(array.shape)} given, model expects {list(info.shape)}")
    if info.quantized and not raw:
        return quantize(info, array)
    if info.dtype.kind in "iu":
        if array.dtype.kind == "f" and not np.array_equal(array, np.rint(array)):
            raise InvalidParams(f"input {info.name!r}: model expects integers ({info.dtype.name})")
        limits = np.iinfo(info.dtype)
        if array.size and (array.min() < limits.min or array.max() > limits.max):
            raise InvalidParams(f"input {info.name!r}: values outside the {info.dtype.name} range")
        return array.astype(info.dtype)
    if info.dtype.kind == "b":
        return array.astype(np.bool_)
    with np.errstate(over="ignore"):
        converted = array.astype(info.dtype)
    if not np.isfinite(converted).all():
        raise InvalidParams(f"input {info.name!r}: values overflow {info.dtype.name}")
    return converted


def quantize(info: TensorInfo, real: np.ndarray) -> np.ndarray:
    """Real values in a quantized tensor's integers: ``q = round(real / scale + zero_point)``, clipped to its range."""
    limits = np.iinfo(info.dtype)
    quantized = np.rint(real.astype(np.float64) / info.scale + info.zero_point)
    return np.clip(quantized, limits.min, limits.max).astype(info.dtype)


def decode_output(info: TensorInfo, array: np.ndarray, *, raw: bool) -> np.ndarray:
    """Dequantize a quantized output unless the client asked for raw integers."""
    if info.quantized and not raw:
        return ((array.astype(np.float32) - info.zero_point) * info.scale).astype(np.float32)
    return array

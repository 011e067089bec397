"""TFLite inference: the only module that imports LiteRT (or its fallback, tflite-runtime).

A :class:`LoadedModel` holds a verified model file and its tensor signature. Interpreters are never shared
between threads (that raises or silently returns wrong results): each worker thread gets its own
interpreter per model, created on first use. ``invoke()`` releases the GIL, so workers run in parallel.
"""

from __future__ import annotations

import base64
import binascii
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.catalog import ModelEntry
from agent.errors import InferenceFailed, InvalidParams, ModelUnavailable

try:
    from ai_edge_litert.interpreter import Interpreter

    RUNTIME = "ai-edge-litert"
except ImportError:  # pragma: no cover - exercised only on boards without a LiteRT wheel
    from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]

    RUNTIME = "tflite-runtime"

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
    """A model ready to run: verified bytes, tensor signature, one interpreter per calling thread."""

    def __init__(self, entry: ModelEntry, content: bytes, num_threads: int = 1) -> None:
        self.entry = entry
        self.num_threads = num_threads
        self._content = content
        self._local = threading.local()
        try:
            probe = self._new_interpreter()
        except (ValueError, RuntimeError) as exc:
            raise ModelUnavailable(f"model {entry.id!r} failed to load: {exc}") from None
        self.inputs = _tensor_infos(probe.get_input_details(), [spec.name for spec in entry.inputs])
        self.outputs = _tensor_infos(probe.get_output_details(), [spec.name for spec in entry.outputs])
        self._local.interpreter = probe
        self._inputs_by_name = {info.name: info for info in self.inputs}

    @property
    def size_bytes(self) -> int:
        return len(self._content)

    def _new_interpreter(self) -> Any:
        interpreter = Interpreter(model_content=self._content, num_threads=self.num_threads)
        interpreter.allocate_tensors()
        return interpreter

    def _thread_interpreter(self) -> Any:
        interpreter = getattr(self._local, "interpreter", None)
        if interpreter is None:
            interpreter = self._new_interpreter()
            self._local.interpreter = interpreter
        return interpreter

    def input_info(self, name: str) -> TensorInfo:
        try:
            return self._inputs_by_name[name]
        except KeyError:
            expected = ", ".join(self._inputs_by_name)
            raise InvalidParams(f"model {self.entry.id!r} has no input {name!r}; its inputs: {expected}") from None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference on this thread's interpreter; ``feeds`` must already match the input tensors."""
        interpreter = self._thread_interpreter()
        try:
            for info in self.inputs:
                interpreter.set_tensor(info.index, feeds[info.name])
            interpreter.invoke()
            return {info.name: interpreter.get_tensor(info.index) for info in self.outputs}
        except (ValueError, RuntimeError) as exc:
            raise InferenceFailed(f"model {self.entry.id!r} failed while running: {exc}") from None


def _decode_b64_tensor(name: str, value: dict[str, Any]) -> np.ndarray:
    unknown = set(value) - {"b64", "dtype", "shape"}
    if unknown:
        raise InvalidParams(f"input {name!r}: unknown field(s) {sorted(unknown)} in a b64 tensor")
    dtype = _B64_DTYPES.get(value.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise InvalidParams(f"input {name!r}: dtype must be one of {sorted(_B64_DTYPES)}")
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
        raise InvalidParams(f"input {name!r}: shape must be a list of non-negative integers")
    try:
        raw = base64.b64decode(value.get("b64", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise InvalidParams(f"input {name!r}: b64 is not valid base64") from None
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidParams(f"input {name!r}: {len(raw)} bytes do not make shape {shape} of {dtype.name} ({expected} bytes)")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
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
        real = array.astype(np.float64)
        limits = np.iinfo(info.dtype)
        quantized = np.rint(real / info.scale + info.zero_point)
        return np.clip(quantized, limits.min, limits.max).astype(info.dtype)
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


def decode_output(info: TensorInfo, array: np.ndarray, *, raw: bool) -> np.ndarray:
    """Dequantize a quantized output unless the client asked for raw integers."""
    if info.quantized and not raw:
        return ((array.astype(np.float32) - info.zero_point) * info.scale).astype(np.float32)
    return array

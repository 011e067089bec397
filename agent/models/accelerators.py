"""Where a model runs: the TFLite runtime (LiteRT or tflite-runtime) and the hardware under it.

With :mod:`agent.models.inference` (and the probe's child, :mod:`agent.models.probe_child`, which imports the
Interpreter by the module name it is given), the only modules that import LiteRT. The runtime is chosen once per agent
(:func:`load_runtime`, ``[inference] runtime``); the hardware per model (:func:`accelerator_for`): ``cpu``
(XNNPACK), ``gpu`` (LiteRT's GPU accelerator through ``CompiledModel``: WebGPU over Vulkan on Linux) or an
external delegate (``load_delegate``: a Coral Edge TPU's ``libedgetpu.so.1``, a vendor's library).
:func:`create_runner` builds one interpreter-like object for a model on its accelerator; a missing or
refusing accelerator is an :class:`AcceleratorUnavailable`, which the caller turns into a CPU fallback or,
with ``[inference] required = true``, a refusal.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from agent.config import INTERPRETER_MODULES, AcceleratorChoice, RuntimeChoice
from agent.errors import ConfigError
from agent.models.catalog import DelegateSpec, ModelEntry

# The entry point every TFLite external delegate exports (load_delegate calls it).
_DELEGATE_SYMBOL = "tflite_plugin_create_delegate"


@dataclass(frozen=True)
class Runtime:
    """The TFLite runtime in use: its name (as status, models/list and /metrics report it), Interpreter and
    ``load_delegate``."""

    name: str
    interpreter: Callable[..., Any]
    load_delegate: Callable[..., Any]


def load_runtime(choice: RuntimeChoice = "auto") -> Runtime:
    """Import the chosen runtime, or for "auto" LiteRT and then tflite-runtime; :class:`ConfigError` if unusable."""
    problems = []
    for name in INTERPRETER_MODULES if choice == "auto" else [choice]:
        try:
            module = importlib.import_module(INTERPRETER_MODULES[name])
        except ImportError as exc:
            problems.append(f"{name}: {exc}")
            continue
        # tflite-runtime is built against numpy 1.x: with numpy 2 every Interpreter() raises SystemError.
        if name == "tflite-runtime" and int(np.__version__.split(".")[0]) >= 2:
            problems.append(f"tflite-runtime needs numpy<2, this is numpy {np.__version__}")
            continue
        return Runtime(name, module.Interpreter, module.load_delegate)
    raise ConfigError(f"[inference] runtime = {choice!r}: no usable TFLite runtime ({'; '.join(problems)})")


class AcceleratorUnavailable(Exception):
    """The accelerator a model asked for is missing, or refused the model."""


@dataclass(frozen=True)
class Accelerator:
    """What a model runs on: ``cpu``, ``gpu`` or an external ``delegate``."""

    kind: Literal["cpu", "gpu", "delegate"]
    delegate: DelegateSpec | None = None

    @property
    def name(self) -> str:
        """As models/list, the status and /metrics report it: ``cpu``, ``gpu`` or ``delegate:<library>``."""
        return f"delegate:{self.delegate.library}" if self.delegate is not None else self.kind


CPU = Accelerator("cpu")


def accelerator_for(entry: ModelEntry, default: AcceleratorChoice) -> Accelerator:
    """The manifest entry's delegate, else its accelerator, else ``[inference] accelerator``."""
    if entry.delegate is not None:
        return Accelerator("delegate", entry.delegate)
    return Accelerator(entry.accelerator or default)


class AcceleratorHistory:
    """Per model version: the accelerator it last loaded on and, after a fallback, why not the one it asked for.

    A version whose accelerator failed once loads on CPU from then on: said once, not retried. Safe to use from
    every thread; its lock is held only to read or write one entry.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[str, str | None]] = {}

    def choose(self, entry: ModelEntry, default: AcceleratorChoice) -> tuple[Accelerator, str | None]:
        """The accelerator to load ``entry`` on, and the earlier failure that makes it CPU (None if none)."""
        with self._lock:
            _, problem = self._seen.get((entry.id, entry.sha256), (None, None))
        return (CPU if problem is not None else accelerator_for(entry, default)), problem

    def record(self, entry: ModelEntry, in_use: str, problem: str | None) -> None:
        """Remember where ``entry`` loaded and, after a fallback, why not on the accelerator it asked for."""
        with self._lock:
            self._seen[(entry.id, entry.sha256)] = (in_use, problem)

    def report(self, entry: ModelEntry, default: AcceleratorChoice) -> dict[str, str | None]:
        """The accelerator ``entry`` asks for, the one it runs on (None until loaded) and why they differ."""
        with self._lock:
            in_use, problem = self._seen.get((entry.id, entry.sha256), (None, None))
        return {"requested": accelerator_for(entry, default).name, "in_use": in_use, "fallback_reason": problem}


def create_runner(accelerator: Accelerator, runtime: Runtime, content: bytes, num_threads: int) -> Any:
    """One ready-to-run interpreter (or, on ``gpu``, a compiled model behind the same methods) for ``content``.

    Only accelerator problems raise :class:`AcceleratorUnavailable`; a model that fails on CPU raises what
    the runtime raises (ValueError, RuntimeError).
    """
    if accelerator.kind == "gpu":
        if runtime.name != "litert":
            raise AcceleratorUnavailable(f"gpu needs LiteRT (ai-edge-litert); the runtime is {runtime.name}")
        try:
            return CompiledModelRunner(content, num_threads, details=runtime.interpreter(model_content=content))
        except (RuntimeError, ValueError) as exc:
            raise AcceleratorUnavailable(f"LiteRT's GPU accelerator refused the model: {_first_line(exc)}") from None
    delegates = []
    if accelerator.delegate is not None:
        delegates.append(_load_delegate(runtime, accelerator.delegate))
    try:
        interpreter = runtime.interpreter(model_content=content, num_threads=num_threads, experimental_delegates=delegates or None)
        interpreter.allocate_tensors()
    except (RuntimeError, ValueError) as exc:
        if delegates:
            raise AcceleratorUnavailable(f"delegate {accelerator.delegate.library} refused the model: {_first_line(exc)}") from None  # type: ignore[union-attr]
        raise
    return interpreter


def _load_delegate(runtime: Runtime, spec: DelegateSpec) -> Any:
    # Checked with ctypes first: load_delegate on a library without the entry point raises AttributeError
    # from a half-built Delegate whose __del__ then fails too (an "Exception ignored" on stderr).
    try:
        library = ctypes.CDLL(spec.library)
    except OSError as exc:
        raise AcceleratorUnavailable(f"delegate library {spec.library} cannot be loaded: {exc}") from None
    if not hasattr(library, _DELEGATE_SYMBOL):
        raise AcceleratorUnavailable(f"{spec.library} is not a TFLite delegate (it has no {_DELEGATE_SYMBOL})")
    options = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in spec.options.items()}
    try:
        return runtime.load_delegate(spec.library, options)
    except (ValueError, RuntimeError, OSError) as exc:
        # e.g. libedgetpu with no Edge TPU attached: the library loads, creating the delegate fails.
        raise AcceleratorUnavailable(f"delegate {spec.library} failed to start: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    # LiteRT's errors carry a multi-line source-location trace after the message.
    return " ".join(str(exc).split("\n", 2)[:2]).strip()


_environment_lock = threading.Lock()
_environment: Any = None


def _gpu_environment() -> Any:
    """One LiteRT environment per process: it owns the WebGPU device, which every compiled model shares."""
    global _environment
    with _environment_lock:
        if _environment is None:
            from ai_edge_litert.environment import Environment

            _environment = Environment.create()
        return _environment


class CompiledModelRunner:
    """A LiteRT ``CompiledModel`` on the GPU accelerator behind the Interpreter methods LoadedModel uses.

    Tensor details (order, quantization) come from an Interpreter of the same model, which is then dropped:
    the manifest names inputs and outputs in the Interpreter's order, and CompiledModel reports no
    quantization. Both number tensors the same way (the model's tensor indices). Ops the GPU cannot run stay
    on XNNPACK (``fully_accelerated`` is then False). f32 is enforced so the outputs match the CPU's.
    """

    def __init__(self, content: bytes, num_threads: int, *, details: Any) -> None:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, GpuOptions, Options

        options = Options(
            hardware_accelerators=HardwareAccelerator.GPU | HardwareAccelerator.CPU,
            cpu_options=CpuOptions(num_threads=num_threads),
            gpu_options=GpuOptions(enforce_f32=True),
        )
        self._model = CompiledModel.from_buffer(content, environment=_gpu_environment(), options=options)
        self.fully_accelerated = self._model.is_fully_accelerated()
        self._input_details = details.get_input_details()
        self._output_details = details.get_output_details()
        signature = next(iter(self._model.get_signature_list()))
        inputs = [int(d["index"]) for d in self._model.get_input_tensor_details(signature).values()]
        outputs = [int(d["index"]) for d in self._model.get_output_tensor_details(signature).values()]
        try:
            self._input_position = {int(d["index"]): inputs.index(int(d["index"])) for d in self._input_details}
            self._output_position = {int(d["index"]): outputs.index(int(d["index"])) for d in self._output_details}
        except ValueError:
            raise ValueError("the compiled model's tensors differ from the interpreter's") from None
        self._shapes = {int(d["index"]): (tuple(int(n) for n in d["shape"]), np.dtype(d["dtype"])) for d in self._output_details}
        self._inputs = self._model.create_input_buffers(0)
        self._outputs = self._model.create_output_buffers(0)

    def get_input_details(self) -> list[dict[str, Any]]:
        """The Interpreter's input details."""
        return self._input_details

    def get_output_details(self) -> list[dict[str, Any]]:
        """The Interpreter's output details."""
        return self._output_details

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        """Copy ``value`` into the input buffer of tensor ``index``."""
        self._inputs[self._input_position[index]].write(np.ascontiguousarray(value))

    def invoke(self) -> None:
        """Run the model on the accelerator."""
        self._model.run_by_index(0, self._inputs, self._outputs)

    def get_tensor(self, index: int) -> np.ndarray:
        """A copy of output tensor ``index``."""
        shape, dtype = self._shapes[index]
        return self._outputs[self._output_position[index]].read(int(np.prod(shape)), dtype).reshape(shape)

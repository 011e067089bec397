"""Minimal TFLite flatbuffer writer for dense classifiers, built on the schema's object API (tflite_schema.py).

Only what the bundled models need: FULLY_CONNECTED (float32 or int8) and SOFTMAX in a single
subgraph with a `serving_default` signature. Quantization follows TFLite's int8 spec: symmetric
per-tensor weights, int32 bias with scale input*weight, int8 softmax output at 1/256, -128.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import flatbuffers
import numpy as np

# The sibling generated schema, not a runtime's copy: writing a model needs no TFLite runtime.
import tflite_schema as schema

# TFLite requires int8 SOFTMAX outputs to use exactly this quantization.
SOFTMAX_INT8_SCALE = 1.0 / 256.0
SOFTMAX_INT8_ZERO_POINT = -128

RELU = schema.ActivationFunctionType.RELU
NO_ACTIVATION = schema.ActivationFunctionType.NONE

# TFLite op versioning: int8 operands need FULLY_CONNECTED v4 and SOFTMAX v2.
_FULLY_CONNECTED_VERSION = {schema.TensorType.FLOAT32: 1, schema.TensorType.INT8: 4}
_SOFTMAX_VERSION = {schema.TensorType.FLOAT32: 1, schema.TensorType.INT8: 2}


def range_quantization(low: float, high: float) -> tuple[float, int]:
    """Asymmetric int8 scale and zero point that map [low, high] onto [-128, 127]."""
    scale = (high - low) / 255.0
    return scale, int(round(-128 - low / scale))


@dataclass
class GraphBuilder:
    """Accumulates buffers, tensors and operators of a single-subgraph TFLite model."""

    # Buffer 0 is the empty sentinel that every non-constant tensor points at.
    buffers: list[schema.BufferT] = field(default_factory=lambda: [schema.BufferT()])
    tensors: list[schema.TensorT] = field(default_factory=list)
    operators: list[schema.OperatorT] = field(default_factory=list)
    operator_codes: list[tuple[int, int]] = field(default_factory=list)

    def add_tensor(
        self,
        name: str,
        shape: Sequence[int],
        tensor_type: int,
        data: np.ndarray | None = None,
        quantization: tuple[float, int] | None = None,
    ) -> int:
        """Add a tensor (constant when `data` is given) and return its index."""
        buffer_index = 0
        if data is not None:
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(data.tobytes(), dtype=np.uint8)
            self.buffers.append(buffer)
            buffer_index = len(self.buffers) - 1
        tensor = schema.TensorT()
        tensor.name = name
        tensor.shape = list(shape)
        tensor.type = tensor_type
        tensor.buffer = buffer_index
        if quantization is not None:
            tensor.quantization = schema.QuantizationParametersT()
            tensor.quantization.scale = [quantization[0]]
            tensor.quantization.zeroPoint = [quantization[1]]
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def add_float_fully_connected(
        self,
        prefix: str,
        input_index: int,
        weights: Sequence[Sequence[float]],
        bias: Sequence[float],
        output_name: str,
        activation: int,
    ) -> int:
        """Append a float32 dense layer (weights are [units, inputs]); return its output tensor."""
        f32 = schema.TensorType.FLOAT32
        weights_f = np.asarray(weights, dtype="<f4")
        units = weights_f.shape[0]
        w = self.add_tensor(f"{prefix}/weights", weights_f.shape, f32, weights_f)
        b = self.add_tensor(f"{prefix}/bias", [units], f32, np.asarray(bias, dtype="<f4"))
        output = self.add_tensor(output_name, [1, units], f32)
        self._add_fully_connected(f32, [input_index, w, b], output, activation)
        return output

    def add_shared_fully_connected(
        self, input_index: int, weights_index: int, bias_index: int, output_name: str, activation: int
    ) -> int:
        """Append a float32 dense layer over constant weights and bias tensors added before (so that many
        layers can share one weight buffer); return its output tensor."""
        units = self.tensors[weights_index].shape[0]
        output = self.add_tensor(output_name, [1, units], schema.TensorType.FLOAT32)
        self._add_fully_connected(schema.TensorType.FLOAT32, [input_index, weights_index, bias_index], output, activation)
        return output

    def add_int8_fully_connected(
        self,
        prefix: str,
        input_index: int,
        weights: Sequence[Sequence[float]],
        bias: Sequence[float],
        output_name: str,
        output_quantization: tuple[float, int],
        activation: int,
    ) -> int:
        """Quantize and append a dense layer the way TFLite's int8 converter lays it out.

        The input tensor must already carry quantization; returns the output tensor index.
        """
        input_scale = self.tensors[input_index].quantization.scale[0]
        real_weights = np.asarray(weights, dtype=np.float64)
        weight_scale = float(np.max(np.abs(real_weights))) / 127.0
        weights_q = np.clip(np.round(real_weights / weight_scale), -127, 127).astype(np.int8)
        bias_scale = input_scale * weight_scale
        bias_q = np.round(np.asarray(bias, dtype=np.float64) / bias_scale).astype("<i4")
        units = weights_q.shape[0]
        int8 = schema.TensorType.INT8
        w = self.add_tensor(f"{prefix}/weights", weights_q.shape, int8, weights_q, (weight_scale, 0))
        b = self.add_tensor(f"{prefix}/bias", [units], schema.TensorType.INT32, bias_q, (bias_scale, 0))
        output = self.add_tensor(output_name, [1, units], int8, quantization=output_quantization)
        self._add_fully_connected(int8, [input_index, w, b], output, activation)
        return output

    def add_softmax(self, input_index: int, output_name: str) -> int:
        """Append SOFTMAX (beta 1) in the input's type; int8 gets the mandatory output params."""
        tensor_type = self.tensors[input_index].type
        quantization = None
        if tensor_type == schema.TensorType.INT8:
            quantization = (SOFTMAX_INT8_SCALE, SOFTMAX_INT8_ZERO_POINT)
        shape = self.tensors[input_index].shape
        output = self.add_tensor(output_name, shape, tensor_type, quantization=quantization)
        options = schema.SoftmaxOptionsT()
        options.beta = 1.0
        self._add_operator(schema.BuiltinOperator.SOFTMAX, _SOFTMAX_VERSION[tensor_type],
                           [input_index], output, schema.BuiltinOptions.SoftmaxOptions, options)
        return output

    def finish(self, description: str, input_index: int, output_index: int) -> bytes:
        """Serialize the graph as a TFLite flatbuffer with a `serving_default` signature."""
        subgraph = schema.SubGraphT()
        subgraph.name = "main"
        subgraph.tensors = self.tensors
        subgraph.inputs = [input_index]
        subgraph.outputs = [output_index]
        subgraph.operators = self.operators

        signature = schema.SignatureDefT()
        signature.signatureKey = "serving_default"
        signature.subgraphIndex = 0
        signature.inputs = [self._tensor_map(input_index)]
        signature.outputs = [self._tensor_map(output_index)]

        model = schema.ModelT()
        model.version = 3
        model.description = description
        model.operatorCodes = [_operator_code(code, version) for code, version in self.operator_codes]
        model.subgraphs = [subgraph]
        model.buffers = self.buffers
        model.signatureDefs = [signature]

        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    def _add_fully_connected(self, tensor_type: int, inputs: list[int], output: int,
                             activation: int) -> None:
        options = schema.FullyConnectedOptionsT()
        options.fusedActivationFunction = activation
        self._add_operator(schema.BuiltinOperator.FULLY_CONNECTED,
                           _FULLY_CONNECTED_VERSION[tensor_type], inputs, output,
                           schema.BuiltinOptions.FullyConnectedOptions, options)

    def _add_operator(self, builtin_code: int, version: int, inputs: list[int], output: int,
                      options_type: int, options: object) -> None:
        if (builtin_code, version) not in self.operator_codes:
            self.operator_codes.append((builtin_code, version))
        operator = schema.OperatorT()
        operator.opcodeIndex = self.operator_codes.index((builtin_code, version))
        operator.inputs = inputs
        operator.outputs = [output]
        operator.builtinOptionsType = options_type
        operator.builtinOptions = options
        self.operators.append(operator)

    def _tensor_map(self, index: int) -> schema.TensorMapT:
        tensor_map = schema.TensorMapT()
        tensor_map.name = self.tensors[index].name
        tensor_map.tensorIndex = index
        return tensor_map


def _operator_code(builtin_code: int, version: int) -> schema.OperatorCodeT:
    code = schema.OperatorCodeT()
    # Readers of schema < 3a only look at the deprecated int8 field, newer ones at builtinCode.
    code.deprecatedBuiltinCode = builtin_code
    code.builtinCode = builtin_code
    code.version = version
    return code

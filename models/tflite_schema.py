"""The part of TFLite's schema (schema.fbs, flatc --python --gen-object-api) that models/tflite_graph.py writes.

Generated code, trimmed to the tables the writer packs: taken from ai-edge-litert's schema_py_generated.py
(Apache-2.0, The TensorFlow Authors) so that writing models needs only `flatbuffers`, not a TFLite runtime.
The object classes keep only __init__ and Pack, the enums only the members used; the packing code is
unchanged, so the files written are byte-identical.
"""
# ruff: noqa
# fmt: off

import flatbuffers
from flatbuffers.compat import import_numpy
np = import_numpy()

class TensorType(object):
    FLOAT32 = 0
    INT32 = 2
    INT8 = 9


class BuiltinOperator(object):
    FULLY_CONNECTED = 9
    SOFTMAX = 25


class BuiltinOptions(object):
    NONE = 0
    FullyConnectedOptions = 8
    SoftmaxOptions = 9


class ActivationFunctionType(object):
    NONE = 0
    RELU = 1


def QuantizationParametersStart(builder):
    builder.StartObject(7)


def QuantizationParametersAddMin(builder, min):
    builder.PrependUOffsetTRelativeSlot(0, flatbuffers.number_types.UOffsetTFlags.py_type(min), 0)


def QuantizationParametersStartMinVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def QuantizationParametersAddMax(builder, max):
    builder.PrependUOffsetTRelativeSlot(1, flatbuffers.number_types.UOffsetTFlags.py_type(max), 0)


def QuantizationParametersStartMaxVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def QuantizationParametersAddScale(builder, scale):
    builder.PrependUOffsetTRelativeSlot(2, flatbuffers.number_types.UOffsetTFlags.py_type(scale), 0)


def QuantizationParametersStartScaleVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def QuantizationParametersAddZeroPoint(builder, zeroPoint):
    builder.PrependUOffsetTRelativeSlot(3, flatbuffers.number_types.UOffsetTFlags.py_type(zeroPoint), 0)


def QuantizationParametersStartZeroPointVector(builder, numElems):
    return builder.StartVector(8, numElems, 8)


def QuantizationParametersAddDetailsType(builder, detailsType):
    builder.PrependUint8Slot(4, detailsType, 0)


def QuantizationParametersAddDetails(builder, details):
    builder.PrependUOffsetTRelativeSlot(5, flatbuffers.number_types.UOffsetTFlags.py_type(details), 0)


def QuantizationParametersAddQuantizedDimension(builder, quantizedDimension):
    builder.PrependInt32Slot(6, quantizedDimension, 0)


def QuantizationParametersEnd(builder):
    return builder.EndObject()


class QuantizationParametersT(object):

    def __init__(self, min=None, max=None, scale=None, zeroPoint=None, detailsType=0, details=None, quantizedDimension=0):
        self.min = min
        self.max = max
        self.scale = scale
        self.zeroPoint = zeroPoint
        self.detailsType = detailsType
        self.details = details
        self.quantizedDimension = quantizedDimension

    def Pack(self, builder):
        if self.min is not None:
            if np is not None and type(self.min) is np.ndarray:
                min = builder.CreateNumpyVector(self.min)
            else:
                QuantizationParametersStartMinVector(builder, len(self.min))
                for i in reversed(range(len(self.min))):
                    builder.PrependFloat32(self.min[i])
                min = builder.EndVector()
        if self.max is not None:
            if np is not None and type(self.max) is np.ndarray:
                max = builder.CreateNumpyVector(self.max)
            else:
                QuantizationParametersStartMaxVector(builder, len(self.max))
                for i in reversed(range(len(self.max))):
                    builder.PrependFloat32(self.max[i])
                max = builder.EndVector()
        if self.scale is not None:
            if np is not None and type(self.scale) is np.ndarray:
                scale = builder.CreateNumpyVector(self.scale)
            else:
                QuantizationParametersStartScaleVector(builder, len(self.scale))
                for i in reversed(range(len(self.scale))):
                    builder.PrependFloat32(self.scale[i])
                scale = builder.EndVector()
        if self.zeroPoint is not None:
            if np is not None and type(self.zeroPoint) is np.ndarray:
                zeroPoint = builder.CreateNumpyVector(self.zeroPoint)
            else:
                QuantizationParametersStartZeroPointVector(builder, len(self.zeroPoint))
                for i in reversed(range(len(self.zeroPoint))):
                    builder.PrependInt64(self.zeroPoint[i])
                zeroPoint = builder.EndVector()
        if self.details is not None:
            details = self.details.Pack(builder)
        QuantizationParametersStart(builder)
        if self.min is not None:
            QuantizationParametersAddMin(builder, min)
        if self.max is not None:
            QuantizationParametersAddMax(builder, max)
        if self.scale is not None:
            QuantizationParametersAddScale(builder, scale)
        if self.zeroPoint is not None:
            QuantizationParametersAddZeroPoint(builder, zeroPoint)
        QuantizationParametersAddDetailsType(builder, self.detailsType)
        if self.details is not None:
            QuantizationParametersAddDetails(builder, details)
        QuantizationParametersAddQuantizedDimension(builder, self.quantizedDimension)
        quantizationParameters = QuantizationParametersEnd(builder)
        return quantizationParameters


def TensorStart(builder):
    builder.StartObject(11)


def TensorAddShape(builder, shape):
    builder.PrependUOffsetTRelativeSlot(0, flatbuffers.number_types.UOffsetTFlags.py_type(shape), 0)


def TensorStartShapeVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def TensorAddType(builder, type):
    builder.PrependInt8Slot(1, type, 0)


def TensorAddBuffer(builder, buffer):
    builder.PrependUint32Slot(2, buffer, 0)


def TensorAddName(builder, name):
    builder.PrependUOffsetTRelativeSlot(3, flatbuffers.number_types.UOffsetTFlags.py_type(name), 0)


def TensorAddQuantization(builder, quantization):
    builder.PrependUOffsetTRelativeSlot(4, flatbuffers.number_types.UOffsetTFlags.py_type(quantization), 0)


def TensorAddIsVariable(builder, isVariable):
    builder.PrependBoolSlot(5, isVariable, 0)


def TensorAddSparsity(builder, sparsity):
    builder.PrependUOffsetTRelativeSlot(6, flatbuffers.number_types.UOffsetTFlags.py_type(sparsity), 0)


def TensorAddShapeSignature(builder, shapeSignature):
    builder.PrependUOffsetTRelativeSlot(7, flatbuffers.number_types.UOffsetTFlags.py_type(shapeSignature), 0)


def TensorStartShapeSignatureVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def TensorAddHasRank(builder, hasRank):
    builder.PrependBoolSlot(8, hasRank, 0)


def TensorAddVariantTensors(builder, variantTensors):
    builder.PrependUOffsetTRelativeSlot(9, flatbuffers.number_types.UOffsetTFlags.py_type(variantTensors), 0)


def TensorStartVariantTensorsVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def TensorAddExternalBuffer(builder, externalBuffer):
    builder.PrependUint32Slot(10, externalBuffer, 0)


def TensorEnd(builder):
    return builder.EndObject()


class TensorT(object):

    def __init__(self, shape=None, type=0, buffer=0, name=None, quantization=None, isVariable=False, sparsity=None, shapeSignature=None, hasRank=False, variantTensors=None, externalBuffer=0):
        self.shape = shape
        self.type = type
        self.buffer = buffer
        self.name = name
        self.quantization = quantization
        self.isVariable = isVariable
        self.sparsity = sparsity
        self.shapeSignature = shapeSignature
        self.hasRank = hasRank
        self.variantTensors = variantTensors
        self.externalBuffer = externalBuffer

    def Pack(self, builder):
        if self.shape is not None:
            if np is not None and type(self.shape) is np.ndarray:
                shape = builder.CreateNumpyVector(self.shape)
            else:
                TensorStartShapeVector(builder, len(self.shape))
                for i in reversed(range(len(self.shape))):
                    builder.PrependInt32(self.shape[i])
                shape = builder.EndVector()
        if self.name is not None:
            name = builder.CreateString(self.name)
        if self.quantization is not None:
            quantization = self.quantization.Pack(builder)
        if self.sparsity is not None:
            sparsity = self.sparsity.Pack(builder)
        if self.shapeSignature is not None:
            if np is not None and type(self.shapeSignature) is np.ndarray:
                shapeSignature = builder.CreateNumpyVector(self.shapeSignature)
            else:
                TensorStartShapeSignatureVector(builder, len(self.shapeSignature))
                for i in reversed(range(len(self.shapeSignature))):
                    builder.PrependInt32(self.shapeSignature[i])
                shapeSignature = builder.EndVector()
        if self.variantTensors is not None:
            variantTensorslist = []
            for i in range(len(self.variantTensors)):
                variantTensorslist.append(self.variantTensors[i].Pack(builder))
            TensorStartVariantTensorsVector(builder, len(self.variantTensors))
            for i in reversed(range(len(self.variantTensors))):
                builder.PrependUOffsetTRelative(variantTensorslist[i])
            variantTensors = builder.EndVector()
        TensorStart(builder)
        if self.shape is not None:
            TensorAddShape(builder, shape)
        TensorAddType(builder, self.type)
        TensorAddBuffer(builder, self.buffer)
        if self.name is not None:
            TensorAddName(builder, name)
        if self.quantization is not None:
            TensorAddQuantization(builder, quantization)
        TensorAddIsVariable(builder, self.isVariable)
        if self.sparsity is not None:
            TensorAddSparsity(builder, sparsity)
        if self.shapeSignature is not None:
            TensorAddShapeSignature(builder, shapeSignature)
        TensorAddHasRank(builder, self.hasRank)
        if self.variantTensors is not None:
            TensorAddVariantTensors(builder, variantTensors)
        TensorAddExternalBuffer(builder, self.externalBuffer)
        tensor = TensorEnd(builder)
        return tensor


def FullyConnectedOptionsStart(builder):
    builder.StartObject(6)


def FullyConnectedOptionsAddFusedActivationFunction(builder, fusedActivationFunction):
    builder.PrependInt8Slot(0, fusedActivationFunction, 0)


def FullyConnectedOptionsAddWeightsFormat(builder, weightsFormat):
    builder.PrependInt8Slot(1, weightsFormat, 0)


def FullyConnectedOptionsAddKeepNumDims(builder, keepNumDims):
    builder.PrependBoolSlot(2, keepNumDims, 0)


def FullyConnectedOptionsAddAsymmetricQuantizeInputs(builder, asymmetricQuantizeInputs):
    builder.PrependBoolSlot(3, asymmetricQuantizeInputs, 0)


def FullyConnectedOptionsAddQuantizedBiasType(builder, quantizedBiasType):
    builder.PrependInt8Slot(4, quantizedBiasType, 0)


def FullyConnectedOptionsAddQuantSpec(builder, quantSpec):
    builder.PrependUOffsetTRelativeSlot(5, flatbuffers.number_types.UOffsetTFlags.py_type(quantSpec), 0)


def FullyConnectedOptionsStartQuantSpecVector(builder, numElems):
    return builder.StartVector(1, numElems, 1)


def FullyConnectedOptionsEnd(builder):
    return builder.EndObject()


class FullyConnectedOptionsT(object):

    def __init__(self, fusedActivationFunction=0, weightsFormat=0, keepNumDims=False, asymmetricQuantizeInputs=False, quantizedBiasType=0, quantSpec=None):
        self.fusedActivationFunction = fusedActivationFunction
        self.weightsFormat = weightsFormat
        self.keepNumDims = keepNumDims
        self.asymmetricQuantizeInputs = asymmetricQuantizeInputs
        self.quantizedBiasType = quantizedBiasType
        self.quantSpec = quantSpec

    def Pack(self, builder):
        if self.quantSpec is not None:
            if np is not None and type(self.quantSpec) is np.ndarray:
                quantSpec = builder.CreateNumpyVector(self.quantSpec)
            else:
                FullyConnectedOptionsStartQuantSpecVector(builder, len(self.quantSpec))
                for i in reversed(range(len(self.quantSpec))):
                    builder.PrependUint8(self.quantSpec[i])
                quantSpec = builder.EndVector()
        FullyConnectedOptionsStart(builder)
        FullyConnectedOptionsAddFusedActivationFunction(builder, self.fusedActivationFunction)
        FullyConnectedOptionsAddWeightsFormat(builder, self.weightsFormat)
        FullyConnectedOptionsAddKeepNumDims(builder, self.keepNumDims)
        FullyConnectedOptionsAddAsymmetricQuantizeInputs(builder, self.asymmetricQuantizeInputs)
        FullyConnectedOptionsAddQuantizedBiasType(builder, self.quantizedBiasType)
        if self.quantSpec is not None:
            FullyConnectedOptionsAddQuantSpec(builder, quantSpec)
        fullyConnectedOptions = FullyConnectedOptionsEnd(builder)
        return fullyConnectedOptions


def SoftmaxOptionsStart(builder):
    builder.StartObject(1)


def SoftmaxOptionsAddBeta(builder, beta):
    builder.PrependFloat32Slot(0, beta, 0.0)


def SoftmaxOptionsEnd(builder):
    return builder.EndObject()


class SoftmaxOptionsT(object):

    def __init__(self, beta=0.0):
        self.beta = beta

    def Pack(self, builder):
        SoftmaxOptionsStart(builder)
        SoftmaxOptionsAddBeta(builder, self.beta)
        softmaxOptions = SoftmaxOptionsEnd(builder)
        return softmaxOptions


def OperatorCodeStart(builder):
    builder.StartObject(4)


def OperatorCodeAddDeprecatedBuiltinCode(builder, deprecatedBuiltinCode):
    builder.PrependInt8Slot(0, deprecatedBuiltinCode, 0)


def OperatorCodeAddCustomCode(builder, customCode):
    builder.PrependUOffsetTRelativeSlot(1, flatbuffers.number_types.UOffsetTFlags.py_type(customCode), 0)


def OperatorCodeAddVersion(builder, version):
    builder.PrependInt32Slot(2, version, 1)


def OperatorCodeAddBuiltinCode(builder, builtinCode):
    builder.PrependInt32Slot(3, builtinCode, 0)


def OperatorCodeEnd(builder):
    return builder.EndObject()


class OperatorCodeT(object):

    def __init__(self, deprecatedBuiltinCode=0, customCode=None, version=1, builtinCode=0):
        self.deprecatedBuiltinCode = deprecatedBuiltinCode
        self.customCode = customCode
        self.version = version
        self.builtinCode = builtinCode

    def Pack(self, builder):
        if self.customCode is not None:
            customCode = builder.CreateString(self.customCode)
        OperatorCodeStart(builder)
        OperatorCodeAddDeprecatedBuiltinCode(builder, self.deprecatedBuiltinCode)
        if self.customCode is not None:
            OperatorCodeAddCustomCode(builder, customCode)
        OperatorCodeAddVersion(builder, self.version)
        OperatorCodeAddBuiltinCode(builder, self.builtinCode)
        operatorCode = OperatorCodeEnd(builder)
        return operatorCode


def OperatorStart(builder):
    builder.StartObject(14)


def OperatorAddOpcodeIndex(builder, opcodeIndex):
    builder.PrependUint32Slot(0, opcodeIndex, 0)


def OperatorAddInputs(builder, inputs):
    builder.PrependUOffsetTRelativeSlot(1, flatbuffers.number_types.UOffsetTFlags.py_type(inputs), 0)


def OperatorStartInputsVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def OperatorAddOutputs(builder, outputs):
    builder.PrependUOffsetTRelativeSlot(2, flatbuffers.number_types.UOffsetTFlags.py_type(outputs), 0)


def OperatorStartOutputsVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def OperatorAddBuiltinOptionsType(builder, builtinOptionsType):
    builder.PrependUint8Slot(3, builtinOptionsType, 0)


def OperatorAddBuiltinOptions(builder, builtinOptions):
    builder.PrependUOffsetTRelativeSlot(4, flatbuffers.number_types.UOffsetTFlags.py_type(builtinOptions), 0)


def OperatorAddCustomOptions(builder, customOptions):
    builder.PrependUOffsetTRelativeSlot(5, flatbuffers.number_types.UOffsetTFlags.py_type(customOptions), 0)


def OperatorStartCustomOptionsVector(builder, numElems):
    return builder.StartVector(1, numElems, 1)


def OperatorAddCustomOptionsFormat(builder, customOptionsFormat):
    builder.PrependInt8Slot(6, customOptionsFormat, 0)


def OperatorAddMutatingVariableInputs(builder, mutatingVariableInputs):
    builder.PrependUOffsetTRelativeSlot(7, flatbuffers.number_types.UOffsetTFlags.py_type(mutatingVariableInputs), 0)


def OperatorStartMutatingVariableInputsVector(builder, numElems):
    return builder.StartVector(1, numElems, 1)


def OperatorAddIntermediates(builder, intermediates):
    builder.PrependUOffsetTRelativeSlot(8, flatbuffers.number_types.UOffsetTFlags.py_type(intermediates), 0)


def OperatorStartIntermediatesVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def OperatorAddLargeCustomOptionsOffset(builder, largeCustomOptionsOffset):
    builder.PrependUint64Slot(9, largeCustomOptionsOffset, 0)


def OperatorAddLargeCustomOptionsSize(builder, largeCustomOptionsSize):
    builder.PrependUint64Slot(10, largeCustomOptionsSize, 0)


def OperatorAddBuiltinOptions2Type(builder, builtinOptions2Type):
    builder.PrependUint8Slot(11, builtinOptions2Type, 0)


def OperatorAddBuiltinOptions2(builder, builtinOptions2):
    builder.PrependUOffsetTRelativeSlot(12, flatbuffers.number_types.UOffsetTFlags.py_type(builtinOptions2), 0)


def OperatorAddDebugMetadataIndex(builder, debugMetadataIndex):
    builder.PrependInt32Slot(13, debugMetadataIndex, -1)


def OperatorEnd(builder):
    return builder.EndObject()


class OperatorT(object):

    def __init__(self, opcodeIndex=0, inputs=None, outputs=None, builtinOptionsType=0, builtinOptions=None, customOptions=None, customOptionsFormat=0, mutatingVariableInputs=None, intermediates=None, largeCustomOptionsOffset=0, largeCustomOptionsSize=0, builtinOptions2Type=0, builtinOptions2=None, debugMetadataIndex=-1):
        self.opcodeIndex = opcodeIndex
        self.inputs = inputs
        self.outputs = outputs
        self.builtinOptionsType = builtinOptionsType
        self.builtinOptions = builtinOptions
        self.customOptions = customOptions
        self.customOptionsFormat = customOptionsFormat
        self.mutatingVariableInputs = mutatingVariableInputs
        self.intermediates = intermediates
        self.largeCustomOptionsOffset = largeCustomOptionsOffset
        self.largeCustomOptionsSize = largeCustomOptionsSize
        self.builtinOptions2Type = builtinOptions2Type
        self.builtinOptions2 = builtinOptions2
        self.debugMetadataIndex = debugMetadataIndex

    def Pack(self, builder):
        if self.inputs is not None:
            if np is not None and type(self.inputs) is np.ndarray:
                inputs = builder.CreateNumpyVector(self.inputs)
            else:
                OperatorStartInputsVector(builder, len(self.inputs))
                for i in reversed(range(len(self.inputs))):
                    builder.PrependInt32(self.inputs[i])
                inputs = builder.EndVector()
        if self.outputs is not None:
            if np is not None and type(self.outputs) is np.ndarray:
                outputs = builder.CreateNumpyVector(self.outputs)
            else:
                OperatorStartOutputsVector(builder, len(self.outputs))
                for i in reversed(range(len(self.outputs))):
                    builder.PrependInt32(self.outputs[i])
                outputs = builder.EndVector()
        if self.builtinOptions is not None:
            builtinOptions = self.builtinOptions.Pack(builder)
        if self.customOptions is not None:
            if np is not None and type(self.customOptions) is np.ndarray:
                customOptions = builder.CreateNumpyVector(self.customOptions)
            else:
                OperatorStartCustomOptionsVector(builder, len(self.customOptions))
                for i in reversed(range(len(self.customOptions))):
                    builder.PrependUint8(self.customOptions[i])
                customOptions = builder.EndVector()
        if self.mutatingVariableInputs is not None:
            if np is not None and type(self.mutatingVariableInputs) is np.ndarray:
                mutatingVariableInputs = builder.CreateNumpyVector(self.mutatingVariableInputs)
            else:
                OperatorStartMutatingVariableInputsVector(builder, len(self.mutatingVariableInputs))
                for i in reversed(range(len(self.mutatingVariableInputs))):
                    builder.PrependBool(self.mutatingVariableInputs[i])
                mutatingVariableInputs = builder.EndVector()
        if self.intermediates is not None:
            if np is not None and type(self.intermediates) is np.ndarray:
                intermediates = builder.CreateNumpyVector(self.intermediates)
            else:
                OperatorStartIntermediatesVector(builder, len(self.intermediates))
                for i in reversed(range(len(self.intermediates))):
                    builder.PrependInt32(self.intermediates[i])
                intermediates = builder.EndVector()
        if self.builtinOptions2 is not None:
            builtinOptions2 = self.builtinOptions2.Pack(builder)
        OperatorStart(builder)
        OperatorAddOpcodeIndex(builder, self.opcodeIndex)
        if self.inputs is not None:
            OperatorAddInputs(builder, inputs)
        if self.outputs is not None:
            OperatorAddOutputs(builder, outputs)
        OperatorAddBuiltinOptionsType(builder, self.builtinOptionsType)
        if self.builtinOptions is not None:
            OperatorAddBuiltinOptions(builder, builtinOptions)
        if self.customOptions is not None:
            OperatorAddCustomOptions(builder, customOptions)
        OperatorAddCustomOptionsFormat(builder, self.customOptionsFormat)
        if self.mutatingVariableInputs is not None:
            OperatorAddMutatingVariableInputs(builder, mutatingVariableInputs)
        if self.intermediates is not None:
            OperatorAddIntermediates(builder, intermediates)
        OperatorAddLargeCustomOptionsOffset(builder, self.largeCustomOptionsOffset)
        OperatorAddLargeCustomOptionsSize(builder, self.largeCustomOptionsSize)
        OperatorAddBuiltinOptions2Type(builder, self.builtinOptions2Type)
        if self.builtinOptions2 is not None:
            OperatorAddBuiltinOptions2(builder, builtinOptions2)
        OperatorAddDebugMetadataIndex(builder, self.debugMetadataIndex)
        operator = OperatorEnd(builder)
        return operator


def SubGraphStart(builder):
    builder.StartObject(6)


def SubGraphAddTensors(builder, tensors):
    builder.PrependUOffsetTRelativeSlot(0, flatbuffers.number_types.UOffsetTFlags.py_type(tensors), 0)


def SubGraphStartTensorsVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def SubGraphAddInputs(builder, inputs):
    builder.PrependUOffsetTRelativeSlot(1, flatbuffers.number_types.UOffsetTFlags.py_type(inputs), 0)


def SubGraphStartInputsVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def SubGraphAddOutputs(builder, outputs):
    builder.PrependUOffsetTRelativeSlot(2, flatbuffers.number_types.UOffsetTFlags.py_type(outputs), 0)


def SubGraphStartOutputsVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def SubGraphAddOperators(builder, operators):
    builder.PrependUOffsetTRelativeSlot(3, flatbuffers.number_types.UOffsetTFlags.py_type(operators), 0)


def SubGraphStartOperatorsVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def SubGraphAddName(builder, name):
    builder.PrependUOffsetTRelativeSlot(4, flatbuffers.number_types.UOffsetTFlags.py_type(name), 0)


def SubGraphAddDebugMetadataIndex(builder, debugMetadataIndex):
    builder.PrependInt32Slot(5, debugMetadataIndex, -1)


def SubGraphEnd(builder):
    return builder.EndObject()


class SubGraphT(object):

    def __init__(self, tensors=None, inputs=None, outputs=None, operators=None, name=None, debugMetadataIndex=-1):
        self.tensors = tensors
        self.inputs = inputs
        self.outputs = outputs
        self.operators = operators
        self.name = name
        self.debugMetadataIndex = debugMetadataIndex

    def Pack(self, builder):
        if self.tensors is not None:
            tensorslist = []
            for i in range(len(self.tensors)):
                tensorslist.append(self.tensors[i].Pack(builder))
            SubGraphStartTensorsVector(builder, len(self.tensors))
            for i in reversed(range(len(self.tensors))):
                builder.PrependUOffsetTRelative(tensorslist[i])
            tensors = builder.EndVector()
        if self.inputs is not None:
            if np is not None and type(self.inputs) is np.ndarray:
                inputs = builder.CreateNumpyVector(self.inputs)
            else:
                SubGraphStartInputsVector(builder, len(self.inputs))
                for i in reversed(range(len(self.inputs))):
                    builder.PrependInt32(self.inputs[i])
                inputs = builder.EndVector()
        if self.outputs is not None:
            if np is not None and type(self.outputs) is np.ndarray:
                outputs = builder.CreateNumpyVector(self.outputs)
            else:
                SubGraphStartOutputsVector(builder, len(self.outputs))
                for i in reversed(range(len(self.outputs))):
                    builder.PrependInt32(self.outputs[i])
                outputs = builder.EndVector()
        if self.operators is not None:
            operatorslist = []
            for i in range(len(self.operators)):
                operatorslist.append(self.operators[i].Pack(builder))
            SubGraphStartOperatorsVector(builder, len(self.operators))
            for i in reversed(range(len(self.operators))):
                builder.PrependUOffsetTRelative(operatorslist[i])
            operators = builder.EndVector()
        if self.name is not None:
            name = builder.CreateString(self.name)
        SubGraphStart(builder)
        if self.tensors is not None:
            SubGraphAddTensors(builder, tensors)
        if self.inputs is not None:
            SubGraphAddInputs(builder, inputs)
        if self.outputs is not None:
            SubGraphAddOutputs(builder, outputs)
        if self.operators is not None:
            SubGraphAddOperators(builder, operators)
        if self.name is not None:
            SubGraphAddName(builder, name)
        SubGraphAddDebugMetadataIndex(builder, self.debugMetadataIndex)
        subGraph = SubGraphEnd(builder)
        return subGraph


def BufferStart(builder):
    builder.StartObject(3)


def BufferAddData(builder, data):
    builder.PrependUOffsetTRelativeSlot(0, flatbuffers.number_types.UOffsetTFlags.py_type(data), 0)


def BufferStartDataVector(builder, numElems):
    return builder.StartVector(1, numElems, 1)


def BufferAddOffset(builder, offset):
    builder.PrependUint64Slot(1, offset, 0)


def BufferAddSize(builder, size):
    builder.PrependUint64Slot(2, size, 0)


def BufferEnd(builder):
    return builder.EndObject()


class BufferT(object):

    def __init__(self, data=None, offset=0, size=0):
        self.data = data
        self.offset = offset
        self.size = size

    def Pack(self, builder):
        if self.data is not None:
            if np is not None and type(self.data) is np.ndarray:
                data = builder.CreateNumpyVector(self.data)
            else:
                BufferStartDataVector(builder, len(self.data))
                for i in reversed(range(len(self.data))):
                    builder.PrependUint8(self.data[i])
                data = builder.EndVector()
        BufferStart(builder)
        if self.data is not None:
            BufferAddData(builder, data)
        BufferAddOffset(builder, self.offset)
        BufferAddSize(builder, self.size)
        buffer = BufferEnd(builder)
        return buffer


def TensorMapStart(builder):
    builder.StartObject(2)


def TensorMapAddName(builder, name):
    builder.PrependUOffsetTRelativeSlot(0, flatbuffers.number_types.UOffsetTFlags.py_type(name), 0)


def TensorMapAddTensorIndex(builder, tensorIndex):
    builder.PrependUint32Slot(1, tensorIndex, 0)


def TensorMapEnd(builder):
    return builder.EndObject()


class TensorMapT(object):

    def __init__(self, name=None, tensorIndex=0):
        self.name = name
        self.tensorIndex = tensorIndex

    def Pack(self, builder):
        if self.name is not None:
            name = builder.CreateString(self.name)
        TensorMapStart(builder)
        if self.name is not None:
            TensorMapAddName(builder, name)
        TensorMapAddTensorIndex(builder, self.tensorIndex)
        tensorMap = TensorMapEnd(builder)
        return tensorMap


def SignatureDefStart(builder):
    builder.StartObject(5)


def SignatureDefAddInputs(builder, inputs):
    builder.PrependUOffsetTRelativeSlot(0, flatbuffers.number_types.UOffsetTFlags.py_type(inputs), 0)


def SignatureDefStartInputsVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def SignatureDefAddOutputs(builder, outputs):
    builder.PrependUOffsetTRelativeSlot(1, flatbuffers.number_types.UOffsetTFlags.py_type(outputs), 0)


def SignatureDefStartOutputsVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def SignatureDefAddSignatureKey(builder, signatureKey):
    builder.PrependUOffsetTRelativeSlot(2, flatbuffers.number_types.UOffsetTFlags.py_type(signatureKey), 0)


def SignatureDefAddSubgraphIndex(builder, subgraphIndex):
    builder.PrependUint32Slot(4, subgraphIndex, 0)


def SignatureDefEnd(builder):
    return builder.EndObject()


class SignatureDefT(object):

    def __init__(self, inputs=None, outputs=None, signatureKey=None, subgraphIndex=0):
        self.inputs = inputs
        self.outputs = outputs
        self.signatureKey = signatureKey
        self.subgraphIndex = subgraphIndex

    def Pack(self, builder):
        if self.inputs is not None:
            inputslist = []
            for i in range(len(self.inputs)):
                inputslist.append(self.inputs[i].Pack(builder))
            SignatureDefStartInputsVector(builder, len(self.inputs))
            for i in reversed(range(len(self.inputs))):
                builder.PrependUOffsetTRelative(inputslist[i])
            inputs = builder.EndVector()
        if self.outputs is not None:
            outputslist = []
            for i in range(len(self.outputs)):
                outputslist.append(self.outputs[i].Pack(builder))
            SignatureDefStartOutputsVector(builder, len(self.outputs))
            for i in reversed(range(len(self.outputs))):
                builder.PrependUOffsetTRelative(outputslist[i])
            outputs = builder.EndVector()
        if self.signatureKey is not None:
            signatureKey = builder.CreateString(self.signatureKey)
        SignatureDefStart(builder)
        if self.inputs is not None:
            SignatureDefAddInputs(builder, inputs)
        if self.outputs is not None:
            SignatureDefAddOutputs(builder, outputs)
        if self.signatureKey is not None:
            SignatureDefAddSignatureKey(builder, signatureKey)
        SignatureDefAddSubgraphIndex(builder, self.subgraphIndex)
        signatureDef = SignatureDefEnd(builder)
        return signatureDef


def ModelStart(builder):
    builder.StartObject(10)


def ModelAddVersion(builder, version):
    builder.PrependUint32Slot(0, version, 0)


def ModelAddOperatorCodes(builder, operatorCodes):
    builder.PrependUOffsetTRelativeSlot(1, flatbuffers.number_types.UOffsetTFlags.py_type(operatorCodes), 0)


def ModelStartOperatorCodesVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def ModelAddSubgraphs(builder, subgraphs):
    builder.PrependUOffsetTRelativeSlot(2, flatbuffers.number_types.UOffsetTFlags.py_type(subgraphs), 0)


def ModelStartSubgraphsVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def ModelAddDescription(builder, description):
    builder.PrependUOffsetTRelativeSlot(3, flatbuffers.number_types.UOffsetTFlags.py_type(description), 0)


def ModelAddBuffers(builder, buffers):
    builder.PrependUOffsetTRelativeSlot(4, flatbuffers.number_types.UOffsetTFlags.py_type(buffers), 0)


def ModelStartBuffersVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def ModelAddMetadataBuffer(builder, metadataBuffer):
    builder.PrependUOffsetTRelativeSlot(5, flatbuffers.number_types.UOffsetTFlags.py_type(metadataBuffer), 0)


def ModelStartMetadataBufferVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def ModelAddMetadata(builder, metadata):
    builder.PrependUOffsetTRelativeSlot(6, flatbuffers.number_types.UOffsetTFlags.py_type(metadata), 0)


def ModelStartMetadataVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def ModelAddSignatureDefs(builder, signatureDefs):
    builder.PrependUOffsetTRelativeSlot(7, flatbuffers.number_types.UOffsetTFlags.py_type(signatureDefs), 0)


def ModelStartSignatureDefsVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def ModelAddExternalBufferGroups(builder, externalBufferGroups):
    builder.PrependUOffsetTRelativeSlot(8, flatbuffers.number_types.UOffsetTFlags.py_type(externalBufferGroups), 0)


def ModelStartExternalBufferGroupsVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def ModelAddExternalBuffers(builder, externalBuffers):
    builder.PrependUOffsetTRelativeSlot(9, flatbuffers.number_types.UOffsetTFlags.py_type(externalBuffers), 0)


def ModelStartExternalBuffersVector(builder, numElems):
    return builder.StartVector(4, numElems, 4)


def ModelEnd(builder):
    return builder.EndObject()


class ModelT(object):

    def __init__(self, version=0, operatorCodes=None, subgraphs=None, description=None, buffers=None, metadataBuffer=None, metadata=None, signatureDefs=None, externalBufferGroups=None, externalBuffers=None):
        self.version = version
        self.operatorCodes = operatorCodes
        self.subgraphs = subgraphs
        self.description = description
        self.buffers = buffers
        self.metadataBuffer = metadataBuffer
        self.metadata = metadata
        self.signatureDefs = signatureDefs
        self.externalBufferGroups = externalBufferGroups
        self.externalBuffers = externalBuffers

    def Pack(self, builder):
        if self.operatorCodes is not None:
            operatorCodeslist = []
            for i in range(len(self.operatorCodes)):
                operatorCodeslist.append(self.operatorCodes[i].Pack(builder))
            ModelStartOperatorCodesVector(builder, len(self.operatorCodes))
            for i in reversed(range(len(self.operatorCodes))):
                builder.PrependUOffsetTRelative(operatorCodeslist[i])
            operatorCodes = builder.EndVector()
        if self.subgraphs is not None:
            subgraphslist = []
            for i in range(len(self.subgraphs)):
                subgraphslist.append(self.subgraphs[i].Pack(builder))
            ModelStartSubgraphsVector(builder, len(self.subgraphs))
            for i in reversed(range(len(self.subgraphs))):
                builder.PrependUOffsetTRelative(subgraphslist[i])
            subgraphs = builder.EndVector()
        if self.description is not None:
            description = builder.CreateString(self.description)
        if self.buffers is not None:
            bufferslist = []
            for i in range(len(self.buffers)):
                bufferslist.append(self.buffers[i].Pack(builder))
            ModelStartBuffersVector(builder, len(self.buffers))
            for i in reversed(range(len(self.buffers))):
                builder.PrependUOffsetTRelative(bufferslist[i])
            buffers = builder.EndVector()
        if self.metadataBuffer is not None:
            if np is not None and type(self.metadataBuffer) is np.ndarray:
                metadataBuffer = builder.CreateNumpyVector(self.metadataBuffer)
            else:
                ModelStartMetadataBufferVector(builder, len(self.metadataBuffer))
                for i in reversed(range(len(self.metadataBuffer))):
                    builder.PrependInt32(self.metadataBuffer[i])
                metadataBuffer = builder.EndVector()
        if self.metadata is not None:
            metadatalist = []
            for i in range(len(self.metadata)):
                metadatalist.append(self.metadata[i].Pack(builder))
            ModelStartMetadataVector(builder, len(self.metadata))
            for i in reversed(range(len(self.metadata))):
                builder.PrependUOffsetTRelative(metadatalist[i])
            metadata = builder.EndVector()
        if self.signatureDefs is not None:
            signatureDefslist = []
            for i in range(len(self.signatureDefs)):
                signatureDefslist.append(self.signatureDefs[i].Pack(builder))
            ModelStartSignatureDefsVector(builder, len(self.signatureDefs))
            for i in reversed(range(len(self.signatureDefs))):
                builder.PrependUOffsetTRelative(signatureDefslist[i])
            signatureDefs = builder.EndVector()
        if self.externalBufferGroups is not None:
            externalBufferGroupslist = []
            for i in range(len(self.externalBufferGroups)):
                externalBufferGroupslist.append(self.externalBufferGroups[i].Pack(builder))
            ModelStartExternalBufferGroupsVector(builder, len(self.externalBufferGroups))
            for i in reversed(range(len(self.externalBufferGroups))):
                builder.PrependUOffsetTRelative(externalBufferGroupslist[i])
            externalBufferGroups = builder.EndVector()
        if self.externalBuffers is not None:
            externalBufferslist = []
            for i in range(len(self.externalBuffers)):
                externalBufferslist.append(self.externalBuffers[i].Pack(builder))
            ModelStartExternalBuffersVector(builder, len(self.externalBuffers))
            for i in reversed(range(len(self.externalBuffers))):
                builder.PrependUOffsetTRelative(externalBufferslist[i])
            externalBuffers = builder.EndVector()
        ModelStart(builder)
        ModelAddVersion(builder, self.version)
        if self.operatorCodes is not None:
            ModelAddOperatorCodes(builder, operatorCodes)
        if self.subgraphs is not None:
            ModelAddSubgraphs(builder, subgraphs)
        if self.description is not None:
            ModelAddDescription(builder, description)
        if self.buffers is not None:
            ModelAddBuffers(builder, buffers)
        if self.metadataBuffer is not None:
            ModelAddMetadataBuffer(builder, metadataBuffer)
        if self.metadata is not None:
            ModelAddMetadata(builder, metadata)
        if self.signatureDefs is not None:
            ModelAddSignatureDefs(builder, signatureDefs)
        if self.externalBufferGroups is not None:
            ModelAddExternalBufferGroups(builder, externalBufferGroups)
        if self.externalBuffers is not None:
            ModelAddExternalBuffers(builder, externalBuffers)
        model = ModelEnd(builder)
        return model

"""What a ``.tflite`` file says about itself beyond what the runtime reports: its operators and its TFLite Metadata.

Two schemas are read. tflite-support's ``metadata_schema.fbs`` (``ModelMetadata``: names, descriptions,
normalization, associated files) is read with the classes flatc generated from it, vendored in
:mod:`agent.models.metadata_schema` (tflite-support itself has no wheels for Python 3.12+). TFLite's
``schema.fbs`` (the ``Model`` table: operator codes, buffers, named metadata) is read by hand with that
schema's field numbers: a handful of fields, and the metadata buffer is sliced out of the file where
the generated ``Buffer.Data(j)`` would read it byte by byte.

Associated files (a label file, say) are packed after the flatbuffer as a zip archive: :mod:`zipfile`
finds its central directory at the end of the file. Only the label files the metadata names are unpacked,
each read no further than :data:`MAX_LABEL_BYTES` past what earlier ones took.

The file is outside input (``models add``, a hot update, a deployment bundle), and flatbuffer offsets may
all point at the same table: the reader charges what it reads (strings, numbers, tables visited) to a
budget of the file's own size, so aliasing cannot make it read one string or vector once per offset.
"""

from __future__ import annotations

import io
import lzma
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import flatbuffers
from flatbuffers import number_types
from flatbuffers.table import Table

from agent.errors import ModelError

if TYPE_CHECKING:
    from agent.models import metadata_schema as schema

METADATA_NAME = "TFLITE_METADATA"
# schema.fbs BuiltinOperator: a graph holding resource variables keeps state between invocations.
VAR_HANDLE = 142
# Label text unpacked from the archive, all files together: a few KB in practice; a zip bomb stops here.
MAX_LABEL_BYTES = 1 << 20
# What zipfile raises for a damaged member: bad CRC or header, encryption, unknown compression, short data.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, OSError,
               zlib.error, lzma.LZMAError)  # fmt: skip


@dataclass(frozen=True)
class TensorMetadata:
    """One input's or output's metadata: name, description, normalization and axis labels."""

    name: str = ""
    description: str = ""
    mean: list[float] | None = None
    std: list[float] | None = None
    labels: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelMetadata:
    """The model's TFLite Metadata (first subgraph), with label files already read from the archive."""

    name: str = ""
    description: str = ""
    version: str = ""
    author: str = ""
    license: str = ""
    inputs: list[TensorMetadata] = field(default_factory=list)
    outputs: list[TensorMetadata] = field(default_factory=list)


@dataclass(frozen=True)
class FileFacts:
    """What the file itself declares: its builtin operator codes and its metadata, if any."""

    builtin_ops: frozenset[int]
    metadata: ModelMetadata | None

    @property
    def has_resource_variables(self) -> bool:
        """Whether the graph keeps state in resource variables between invocations."""
        return VAR_HANDLE in self.builtin_ops


class _Budget:
    """What the reader may still read: one unit per character, number or table visited."""

    def __init__(self, units: int) -> None:
        self.left = units

    def charge(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise ModelError("the model file's flatbuffer is damaged: its offsets read more than the file holds")


class _PackedFiles:
    """The zip archive after the flatbuffer, if any; a file is unpacked only when the metadata names it."""

    def __init__(self, content: bytes) -> None:
        self._content = content
        self._archive: zipfile.ZipFile | None = None
        self._unpacked = 0

    def _opened(self) -> zipfile.ZipFile | None:
        # Opened only when a label file is named: trailing bytes nobody asks for are not the reader's business.
        if self._archive is None:
            try:
                self._archive = zipfile.ZipFile(io.BytesIO(self._content))
            except zipfile.BadZipFile:  # no files packed with the model
                return None
            except _ZIP_ERRORS as exc:
                raise ModelError(f"the zip archive packed in the model is damaged: {exc!r}") from None
        return self._archive

    def read(self, name: str) -> bytes:
        """The file ``name``; :class:`ModelError` if it is missing, damaged or past :data:`MAX_LABEL_BYTES`."""
        archive = self._opened()
        if archive is None or name not in archive.NameToInfo:
            raise ModelError(f"label file {name!r} is named in the metadata but not packed in the model")
        allowed = MAX_LABEL_BYTES - self._unpacked
        try:
            with archive.open(name) as packed:
                data = packed.read(allowed + 1)  # never more, whatever the archive claims or inflates to
        except _ZIP_ERRORS as exc:
            raise ModelError(f"label file {name!r} packed in the model is damaged: {exc!r}") from None
        if len(data) > allowed:
            raise ModelError(f"the label files packed in the model hold more than {MAX_LABEL_BYTES} bytes")
        self._unpacked += len(data)
        return data


class _Reader:
    """Field access on one flatbuffer table; ``slot`` is the field's number in its schema."""

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int) -> None:
        self.buf = buf
        self.table = Table(buf, pos)

    def _offset(self, slot: int) -> int:
        return self.table.Offset(4 + 2 * slot)

    def string(self, slot: int) -> str:
        offset = self._offset(slot)
        return self.table.String(offset + self.table.Pos).decode("utf-8", "replace") if offset else ""

    def scalar(self, slot: int, flags: type, default: int = 0) -> int:
        offset = self._offset(slot)
        return self.table.Get(flags, offset + self.table.Pos) if offset else default

    def tables(self, slot: int) -> list[_Reader]:
        offset = self._offset(slot)
        if not offset:
            return []
        start = self.table.Vector(offset)
        return [_Reader(self.buf, self.table.Indirect(start + 4 * k)) for k in range(self.table.VectorLen(offset))]

    def bytes_vector(self, slot: int) -> bytes:
        offset = self._offset(slot)
        if not offset:
            return b""
        start = self.table.Vector(offset)
        return bytes(self.buf[start:start + self.table.VectorLen(offset)])


def _root(buf: bytes | bytearray | memoryview) -> _Reader:
    return _Reader(buf, flatbuffers.encode.Get(number_types.UOffsetTFlags.packer_type, buf, 0))


def read_file_facts(content: bytes) -> FileFacts:
    """Read a model file's operators and metadata; :class:`ModelError` if it is not a TFLite flatbuffer."""
    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ModelError("not a TFLite model (no TFL3 identifier)")
    try:
        model = _root(content)
        # OperatorCode: deprecated_builtin_code (0, byte) is the code below 127, builtin_code (3) above it.
        ops = frozenset(
            max(code.scalar(0, number_types.Int8Flags), code.scalar(3, number_types.Int32Flags))
            for code in model.tables(1)
        )
        metadata = _model_metadata(content, model, _Budget(len(content)))
    # struct.error: an offset past the end; TypeError: flatbuffers' own check of an offset outside uint32.
    except (IndexError, ValueError, UnicodeError, struct.error, TypeError) as exc:
        raise ModelError(f"the model file's flatbuffer is damaged: {exc}") from None
    return FileFacts(ops, metadata)


def _model_metadata(content: bytes, model: _Reader, budget: _Budget) -> ModelMetadata | None:
    buffers = model.tables(4)  # Model.buffers; Model.metadata (6) names one of them
    for entry in model.tables(6):
        name = entry.string(0)
        budget.charge(1 + len(name))
        if name != METADATA_NAME:
            continue
        index = entry.scalar(1, number_types.Uint32Flags)
        if index >= len(buffers):
            raise ModelError(f"{METADATA_NAME} names buffer {index}, the model has {len(buffers)}")
        # Buffer: data (0) inline, or offset (1) and size (2) into the file for models over 2 GB.
        data = buffers[index].bytes_vector(0)
        if not data:
            start = buffers[index].scalar(1, number_types.Uint64Flags)
            data = content[start:start + buffers[index].scalar(2, number_types.Uint64Flags)]
        # Imported only for a file that has metadata (most have none): flatc's generated classes are the
        # largest module the agent would otherwise import before it comes online.
        from agent.models import metadata_schema as schema

        if not schema.ModelMetadata.ModelMetadataBufferHasIdentifier(data, 0):
            raise ModelError(f"{METADATA_NAME} is not a metadata flatbuffer (identifier {data[4:8]!r})")
        root = schema.ModelMetadata.GetRootAs(data, 0)
        return _parse_metadata(root, _PackedFiles(content), budget)
    return None


def _text(value: bytes | None, budget: _Budget) -> str:
    if not value:
        return ""
    budget.charge(len(value))
    return value.decode("utf-8", "replace")


def _parse_metadata(root: schema.ModelMetadata, files: _PackedFiles, budget: _Budget) -> ModelMetadata:
    first = root.SubgraphMetadata(0) if root.SubgraphMetadataLength() else None
    inputs = _tensors(first.InputTensorMetadataLength(), first.InputTensorMetadata, files, budget) if first else []
    outputs = _tensors(first.OutputTensorMetadataLength(), first.OutputTensorMetadata, files, budget) if first else []
    return ModelMetadata(
        name=_text(root.Name(), budget),
        description=_text(root.Description(), budget),
        version=_text(root.Version(), budget),
        author=_text(root.Author(), budget),
        license=_text(root.License(), budget),
        inputs=inputs,
        outputs=outputs,
    )


def _tensors(
    count: int, tensor_at: Callable[[int], schema.TensorMetadata], files: _PackedFiles, budget: _Budget
) -> list[TensorMetadata]:
    tensors = []
    for k in range(count):
        budget.charge(1)
        tensors.append(_tensor_metadata(tensor_at(k), files, budget))
    return tensors


def _tensor_metadata(tensor: schema.TensorMetadata, files: _PackedFiles, budget: _Budget) -> TensorMetadata:
    from agent.models import metadata_schema as schema  # loaded already: _model_metadata found metadata

    mean = std = None
    for k in range(tensor.ProcessUnitsLength()):
        budget.charge(1)
        unit = tensor.ProcessUnits(k)
        options = unit.Options()
        if unit.OptionsType() == schema.ProcessUnitOptions.NormalizationOptions and options is not None:
            normalization = schema.NormalizationOptions()
            normalization.Init(options.Bytes, options.Pos)
            budget.charge(normalization.MeanLength() + normalization.StdLength())
            mean = [normalization.Mean(j) for j in range(normalization.MeanLength())]
            std = [normalization.Std(j) for j in range(normalization.StdLength())]
    labels: list[str] = []
    for k in range(tensor.AssociatedFilesLength()):
        budget.charge(1)
        associated = tensor.AssociatedFiles(k)
        name = _text(associated.Name(), budget)
        if associated.Type() == schema.AssociatedFileType.TENSOR_AXIS_LABELS and not labels:
            labels = [line.strip() for line in files.read(name).decode("utf-8").splitlines() if line.strip()]
    return TensorMetadata(_text(tensor.Name(), budget), _text(tensor.Description(), budget), mean, std, labels)

"""The ``model_file`` fuzz target: any bytes as a ``.tflite`` file, as ``models add``, a hot update or a
deployment bundle hands them to the agent.

The input is the file itself (no :class:`~tests.fuzz.fuzzed.FuzzedInput` framing), so real models are seeds
as they are. :func:`~agent.models.tflite_file.read_file_facts` (the ``Model`` table read by hand, TFLite
Metadata through the generated schema, label files from the packed zip archive) returns facts or raises
:class:`ModelError`; nothing else escapes, and what it returns is no bigger than the file allows (label
files unpack to at most MAX_LABEL_BYTES; offsets that all point at one string do not read it once each).
Facts that read are then checked against each bundled manifest entry with
:func:`~agent.models.modelfile.complete_entry`, as the tensors the runtime reported for the bundled file.

The runtime itself never reads the fuzzed bytes here: LiteRT's ``Interpreter(model_content=...)`` segfaults
on some damaged files that read_file_facts accepts (``corpus/model_file/crash-litert-segv-*``: two bytes of
sensor_state.tflite changed), which would end the fuzzer rather than report an input.
"""

from __future__ import annotations

from functools import cache

from agent.errors import ModelError
from agent.models.accelerators import load_runtime
from agent.models.catalog import ModelEntry, load_manifest, verified_model_bytes
from agent.models.modelfile import ModelDescription, complete_entry, describe_model
from agent.models.probe import ModelProbe
from agent.models.tflite_file import MAX_LABEL_BYTES, FileFacts, ModelMetadata, read_file_facts


@cache
def _bundled() -> list[tuple[ModelEntry, ModelDescription]]:
    """Each bundled entry, stripped of what the file's metadata may fill in, and its runtime description."""
    from tests.fuzz.targets import _models_dir  # the targets' shared scratch copy of the bundled models

    models_dir = _models_dir()
    pairs = []
    for entry in load_manifest(models_dir).models:
        # Bundled files: the probe knows them and spawns nothing.
        description = describe_model(ModelProbe(load_runtime()), verified_model_bytes(models_dir, entry), entry.file)
        bare = entry.model_copy(update={"labels": [], "description": "", "stateful": None})
        pairs.append((bare, description))
    return pairs


def _text_size(metadata: ModelMetadata | None) -> int:
    """Characters and numbers the metadata holds: what the reader allocated for it."""
    if metadata is None:
        return 0
    size = sum(len(value) for value in (metadata.name, metadata.description, metadata.version, metadata.author,
                                        metadata.license))  # fmt: skip
    for tensor in (*metadata.inputs, *metadata.outputs):
        size += len(tensor.name) + len(tensor.description) + sum(len(label) for label in tensor.labels)
        size += len(tensor.mean or []) + len(tensor.std or [])
    return size


def target_model_file(data: bytes) -> None:
    """Any model file: facts or a ModelError; the facts bounded by the file; entries completed or refused."""
    try:
        facts = read_file_facts(data)
    except ModelError:
        return
    assert isinstance(facts, FileFacts), facts
    assert len(facts.builtin_ops) <= len(data), len(facts.builtin_ops)
    size = _text_size(facts.metadata)
    assert size <= len(data) + MAX_LABEL_BYTES, f"{size} characters of metadata read from {len(data)} bytes"
    for entry, description in _bundled():
        try:
            complete_entry(entry, ModelDescription(description.inputs, description.outputs, facts))
        except ModelError:
            pass

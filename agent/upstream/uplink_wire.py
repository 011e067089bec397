"""The uplink's wire format: single and batch envelopes, their compression, and the cloud side's decoder.

Single envelope (UTF-8 JSON), one outbox record per message on ``mcp/up/{device_id}/{class}`` (and
``mcp/cloud/req/{device_id}`` for cloud-fallback requests)::

    {"msg_id", "class", "seq", "device_id", "enqueued_at", "age_ms", "body"}

Batch envelope, many records of one class per message on ``mcp/up/{device_id}/{class}/batch``, compressed
as the MQTT 5 user property ``encoding`` says (``zlib``: RFC 1950 zlib stream; ``none``: plain UTF-8)::

    {"batch_id", "device_id", "class", "count", "records": [single envelope, ...]}

``records`` are in outbox order (ascending ``seq``). The full contract is in docs/cloud.md.
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import UpstreamFormatError
from agent.mqtt.topics import UPSTREAM_BATCH_SUFFIX, UPSTREAM_PREFIX, upstream_topic

Compression = Literal["zlib", "none"]
BATCH_SUFFIX = UPSTREAM_BATCH_SUFFIX
ENCODING_PROPERTY = "encoding"
DEFAULT_MAX_DECODED_BYTES = 64 * 1024 * 1024

# zlib's default level 6 took 16.7 ms for a 163 KB batch of tensor replies (8 ms of agent CPU per 82 KB face
# reply); level 1 takes 2.0 ms for 11 % more bytes (ratio 0.49 against 0.44; 0.029 against 0.027 for small replies).
_ZLIB_LEVEL = 1


class ClaimedRecord(Protocol):
    """What the uplink needs of a claimed outbox row (``agent.upstream.outbox.OutboxRecord`` has it)."""

    @property
    def id(self) -> int: ...
    @property
    def msg_id(self) -> str: ...
    @property
    def cls(self) -> str: ...
    @property
    def body(self) -> bytes: ...
    @property
    def enqueued_wall(self) -> float: ...
    @property
    def age_s(self) -> float: ...
    @property
    def remaining_ttl_s(self) -> float | None: ...


class UpstreamRecord(BaseModel):
    """The single upstream envelope, as the cloud side parses it."""

    model_config = ConfigDict(populate_by_name=True)

    msg_id: str
    cls: str = Field(alias="class")
    seq: int
    device_id: str
    enqueued_at: float
    age_ms: int
    body: Any


class UpstreamBatch(BaseModel):
    """The batch envelope (after decompression), as the cloud side parses it."""

    model_config = ConfigDict(populate_by_name=True)

    batch_id: str
    device_id: str
    cls: str = Field(alias="class")
    count: int
    records: list[UpstreamRecord]


def encode_envelope(record: ClaimedRecord, device_id: str) -> bytes:
    """The single upstream envelope; the stored body (already JSON) is spliced in without re-encoding.

    Byte for byte what ``json.dumps`` of the head with compact separators gives (a property test holds it to
    that), written field by field: ``json.dumps`` with custom separators builds a new encoder per call, which
    made this about half of the drain thread's CPU under load.
    """
    return (
        f'{{"msg_id":{_quoted(record.msg_id)},"class":{_json_string(record.cls)},"seq":{_json_number(record.id)},'
        f'"device_id":{_json_string(device_id)},"enqueued_at":{_json_number(record.enqueued_wall)},'
        f'"age_ms":{int(record.age_s * 1000)},"body":'
    ).encode() + record.body + b"}"


# What ``json.dumps`` (ensure_ascii, its default) writes for a str, called directly.
_quoted = json.encoder.encode_basestring_ascii


@functools.lru_cache(maxsize=256)
def _json_string(text: str) -> str:
    """``json.dumps(text)``, remembered: device ids and class names repeat in every envelope."""
    return _quoted(text)


def _json_number(value: float) -> str:
    """``json.dumps(value)``: an int or a finite float prints as its ``repr``; anything else goes to json."""
    kind = type(value)
    return repr(value) if kind is int or (kind is float and math.isfinite(value)) else json.dumps(value)


def _batch_head(batch_id: str, device_id: str, cls: str, count: int) -> bytes:
    head = {"batch_id": batch_id, "device_id": device_id, "class": cls, "count": count}
    return json.dumps(head, separators=(",", ":")).encode()[:-1] + b',"records":['


def encode_batch(
    envelopes: Sequence[bytes], *, batch_id: str, device_id: str, cls: str, compression: Compression
) -> bytes:
    """The batch payload of already encoded single envelopes, compressed as ``compression`` says."""
    document = _batch_head(batch_id, device_id, cls, len(envelopes)) + b",".join(envelopes) + b"]}"
    return zlib.compress(document, _ZLIB_LEVEL) if compression == "zlib" else document


def batch_topic(device_id: str, cls: str) -> str:
    """Where a batch of a class's records is published."""
    return f"{upstream_topic(device_id, cls)}/{BATCH_SUFFIX}"


def is_batch_topic(topic: str) -> bool:
    parts = topic.split("/")
    return len(parts) == 5 and f"{parts[0]}/{parts[1]}" == UPSTREAM_PREFIX and parts[4] == BATCH_SUFFIX


def decompress(payload: bytes, encoding: str, max_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> bytes:
    """The JSON document of a batch payload; refuses unknown encodings and anything over ``max_bytes``
    decoded (a small payload can inflate a thousandfold)."""
    if encoding == "none":
        return payload
    if encoding != "zlib":
        raise UpstreamFormatError(f"unknown batch encoding {encoding!r}")
    inflater = zlib.decompressobj()
    try:
        document = inflater.decompress(payload, max_bytes)
    except zlib.error as exc:
        raise UpstreamFormatError(f"corrupt zlib batch: {exc}") from None
    if inflater.unconsumed_tail:
        raise UpstreamFormatError(f"batch inflates beyond {max_bytes} bytes")
    if not inflater.eof:
        raise UpstreamFormatError("truncated zlib batch")
    return document


def decode_batch(payload: bytes, encoding: str, max_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> UpstreamBatch:
    """A batch message's envelope; raises :class:`UpstreamFormatError` if it is not a valid one."""
    try:
        batch = UpstreamBatch.model_validate_json(decompress(payload, encoding, max_bytes))
    except ValidationError as exc:
        raise UpstreamFormatError(f"not a batch envelope: {exc}") from None
    if batch.count != len(batch.records):
        raise UpstreamFormatError(f"batch {batch.batch_id} says {batch.count} records but holds {len(batch.records)}")
    return batch


def decode_upstream(
    topic: str, payload: bytes, user_properties: Mapping[str, str], max_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> list[UpstreamRecord]:
    """The records of one upstream message, single or batch (told apart by the topic), in outbox order."""
    if is_batch_topic(topic):
        return decode_batch(payload, user_properties.get(ENCODING_PROPERTY, "none"), max_bytes).records
    try:
        return [UpstreamRecord.model_validate_json(payload)]
    except ValidationError as exc:
        raise UpstreamFormatError(f"not an upstream envelope: {exc}") from None

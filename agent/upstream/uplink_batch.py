"""How claimed outbox rows become cloud publications: one per record, or batches of many for metered links.

Without ``[cloud] batch`` every record is its own publication, sent as soon as it is claimed. With it, the
records of each class collect in a FIFO buffer and leave as one batch message (docs/cloud.md) when the
buffer holds ``batch_max_records`` records or ``batch_max_bytes`` of envelopes, or when its oldest record
is due: ``batch_linger_ms`` after it was enqueued, on the boot clock (a backlog is therefore sent at once,
in full batches). A batch is a prefix of its class's buffer, so records keep their outbox order; batches of
a class leave in order. Cloud-fallback requests are never held or batched: they carry a deadline, and the
cloud service answering them reads one request per message.

A record whose envelope alone reaches ``batch_max_bytes`` is sent as a single envelope, uncompressed. A batch
that would exceed the broker's Maximum Packet Size is halved until it fits; a single record that cannot fit is
handed back to be dead-lettered with reason 0x95 (packet too large).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import CloudBroker
from agent.mqtt.topics import upstream_topic
from agent.upstream.message_ids import new_msg_id
from agent.upstream.uplink_wire import ENCODING_PROPERTY, ClaimedRecord, batch_topic, encode_batch, encode_envelope

# Fixed header, topic length, packet id and properties: more than any publication here carries.
PACKET_OVERHEAD = 256
UNBATCHED_CLASSES = frozenset({"fallback"})


@dataclass(frozen=True)
class Publication:
    """One QoS 1 PUBLISH and the outbox rows its PUBACK settles (all of them, with its reason code)."""

    topic: str
    payload: bytes
    properties: Properties
    row_ids: tuple[int, ...]
    batch: bool

    @property
    def estimated_packet_bytes(self) -> int:
        return len(self.payload) + len(self.topic.encode()) + PACKET_OVERHEAD


@dataclass(slots=True)  # one per record: a frozen dataclass's __init__ costs three times as much
class _Held:
    record: ClaimedRecord
    envelope: bytes
    claimed_at: float
    due: float

    def remaining_ttl_s(self, now: float) -> float | None:
        ttl = self.record.remaining_ttl_s
        return None if ttl is None else ttl - (now - self.claimed_at)


class Batcher:
    """Per-class buffers of claimed records and the decision of what to publish now (drain thread only)."""

    def __init__(self, cloud: CloudBroker, device_id: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.batching = cloud.batch
        self.max_records = cloud.batch_max_records if cloud.batch else 1
        self.max_bytes = cloud.batch_max_bytes
        self.linger_s = cloud.batch_linger_ms / 1000
        self.compression = cloud.compression
        self.device_id = device_id
        self._clock = clock
        self._buffers: dict[str, collections.deque[_Held]] = {}
        self._bytes: collections.Counter[str] = collections.Counter()
        self._mean_envelope_bytes: float | None = None
        self.buffered = 0

    def add(self, records: Sequence[ClaimedRecord]) -> None:
        """Hold claimed records (in claim order, which is outbox order within each class)."""
        now = self._clock()
        added_bytes = 0
        for record in records:
            envelope = encode_envelope(record, self.device_id)
            due = now + max(0.0, self.linger_s - record.age_s) if self.batching else now
            self._buffers.setdefault(record.cls, collections.deque()).append(_Held(record, envelope, now, due))
            self._bytes[record.cls] += len(envelope) + 1
            added_bytes += len(envelope) + 1
        self.buffered += len(records)
        if records:
            self._mean_envelope_bytes = added_bytes / len(records)

    def claim_limit(self, free_slots: int) -> int:
        """How many more rows to claim to fill ``free_slots`` publications, by count and, when batching, by
        bytes (estimated from the last claim's envelopes), so a window of large records is never all in memory."""
        rows = free_slots * self.max_records - self.buffered
        if not self.batching:
            return rows
        if self._mean_envelope_bytes is None:
            return min(rows, free_slots)
        budget = free_slots * self.max_bytes - sum(self._bytes.values())
        return min(rows, math.ceil(max(0, budget) / self._mean_envelope_bytes))

    def next_due(self) -> float | None:
        """When the earliest held partial batch must leave, on the monotonic clock; None if nothing is held."""
        heads = [buffer[0].due for buffer in self._buffers.values() if buffer]
        return min(heads) if heads else None

    def take(self, slots: int, *, max_packet: int | None, flush: bool = False) -> tuple[list[Publication], list[int]]:
        """Up to ``slots`` publications ready now (all held records if ``flush``), and the ids of records
        too large for any packet the broker accepts."""
        now = self._clock()
        publications: list[Publication] = []
        too_large: list[int] = []
        order = sorted(self._buffers, key=lambda cls: cls not in UNBATCHED_CLASSES)
        for cls in order:
            buffer = self._buffers[cls]
            while buffer and len(publications) < slots and (flush or self._ready(cls, buffer, now)):
                held = self._cut(cls, buffer)
                publication = self._publication(cls, held, now)
                while max_packet and publication.estimated_packet_bytes > max_packet and len(held) > 1:
                    keep = len(held) // 2
                    self._put_back(cls, buffer, held[keep:])
                    held = held[:keep]
                    publication = self._publication(cls, held, now)
                if max_packet and publication.estimated_packet_bytes > max_packet:
                    too_large.append(held[0].record.id)
                else:
                    publications.append(publication)
        return publications, too_large

    def take_all(self) -> list[int]:
        """Forget every held record and return their row ids (to release them back to the outbox)."""
        ids = [held.record.id for buffer in self._buffers.values() for held in buffer]
        self._buffers.clear()
        self._bytes.clear()
        self.buffered = 0
        return ids

    def _ready(self, cls: str, buffer: collections.deque[_Held], now: float) -> bool:
        if not self.batching or cls in UNBATCHED_CLASSES:
            return True
        return len(buffer) >= self.max_records or self._bytes[cls] >= self.max_bytes or buffer[0].due <= now

    def _cut(self, cls: str, buffer: collections.deque[_Held]) -> list[_Held]:
        """The longest prefix within the record and byte limits; at least one record."""
        held = [buffer.popleft()]
        size = len(held[0].envelope) + 1
        if self.batching and cls not in UNBATCHED_CLASSES:
            while buffer and len(held) < self.max_records and size + len(buffer[0].envelope) + 1 <= self.max_bytes:
                held.append(buffer.popleft())
                size += len(held[-1].envelope) + 1
        self._bytes[cls] -= size
        self.buffered -= len(held)
        return held

    def _put_back(self, cls: str, buffer: collections.deque[_Held], held: Sequence[_Held]) -> None:
        buffer.extendleft(reversed(held))
        self._bytes[cls] += sum(len(h.envelope) + 1 for h in held)
        self.buffered += len(held)

    def _publication(self, cls: str, held: Sequence[_Held], now: float) -> Publication:
        properties = Properties(PacketTypes.PUBLISH)
        properties.ContentType = "application/json"
        ttls = [ttl for ttl in (h.remaining_ttl_s(now) for h in held) if ttl is not None]
        if ttls:
            properties.MessageExpiryInterval = max(1, math.ceil(min(ttls)))
        row_ids = tuple(h.record.id for h in held)
        # A record as large as a whole batch gains nothing from batching and costs the most to compress (an
        # 82 KB tensor reply: about 1 ms of zlib and 0.8 ms more of batch handling per reply): it travels alone.
        alone = len(held) == 1 and len(held[0].envelope) + 1 >= self.max_bytes
        if not self.batching or cls in UNBATCHED_CLASSES or alone:
            properties.UserProperty = [("msg-id", held[0].record.msg_id)]
            properties.PayloadFormatIndicator = 1
            return Publication(upstream_topic(self.device_id, cls), held[0].envelope, properties, row_ids, False)
        batch_id = new_msg_id()
        payload = encode_batch(
            [h.envelope for h in held],
            batch_id=batch_id,
            device_id=self.device_id,
            cls=cls,
            compression=self.compression,
        )
        properties.UserProperty = [
            ("batch-id", batch_id),
            ("msg-count", str(len(held))),
            (ENCODING_PROPERTY, self.compression),
        ]
        if self.compression == "none":
            properties.PayloadFormatIndicator = 1
        return Publication(batch_topic(self.device_id, cls), payload, properties, row_ids, True)

"""``fleet serve``: the chunk service devices download bundles from (the wire is :mod:`agent.deploy.transfer`'s).

A device publishes ``{"bundle": "<model>@<version>", "file": name, "chunks": [i, ...]}`` on
``mcp/files/req/{device}``; each chunk is answered on ``mcp/files/res/{device}`` with the raw bytes and the
user properties ``bundle``, ``file``, ``chunk`` (or ``error`` for a bundle or file the store does not hold).
The service keeps nothing but a cache of the store's (immutable) manifests, so any number of instances share
the request topic through the MQTT 5 shared subscription ``$share/{group}/mcp/files/req/+``: the broker
gives each request to one of them, and a device whose request was lost asks again after its chunk timeout.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.config import CloudBroker
from agent.deploy.documents import SEGMENT, BundleManifest
from agent.errors import ProvisioningError
from agent.faults import INTERNAL_ERRORS
from agent.mqtt import topics
from agent.mqtt.transport import configure_broker_access, new_client
from provisioning.rollout.bundles import BundleStore

log = logging.getLogger(__name__)

MAX_CHUNKS_PER_REQUEST = 256
MAX_REQUEST_BYTES = 16 * 1024


class ChunkRequest(BaseModel):
    """What a device asks for (agent.deploy.transfer builds it)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    bundle: str = Field(max_length=160)
    file: str = Field(pattern=SEGMENT)
    chunks: list[int] = Field(max_length=MAX_CHUNKS_PER_REQUEST)


@dataclass
class ServiceCounts:
    """What one instance did since it started (``fleet serve`` logs them; benchmarks read them)."""

    requests: int = 0
    chunks: int = 0
    bytes: int = 0
    refused: int = 0
    devices: set[str] = field(default_factory=set)


class ChunkService:
    """One instance: ``start()``, then ``stop()``."""

    def __init__(self, store: BundleStore, broker: CloudBroker, *, client_id: str = "fleet-serve-1",
                 group: str = "fleet-serve") -> None:  # fmt: skip
        self.store = store
        self.broker = broker
        self.topic_filter = f"$share/{group}/{topics.FILES_PREFIX}/req/+"
        self.counts = ServiceCounts()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._manifest = lru_cache(maxsize=64)(self._load_manifest)
        self._client = new_client(client_id)
        configure_broker_access(self._client, broker)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_message = self._on_message

    def start(self, timeout: float = 30.0) -> None:
        """Connect and subscribe; raises ProvisioningError if not subscribed within ``timeout``."""
        self._client.connect_async(self.broker.host, self.broker.port)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise ProvisioningError(f"chunk service: not subscribed on {self.broker.host}:{self.broker.port} "
                                    f"within {timeout:.0f} s")  # fmt: skip

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("chunk service: the broker refused the connection: %s", reason)
            return
        client.subscribe(self.topic_filter, qos=0)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._answer(message.topic, message.payload)
        except Exception as exc:  # one bad request must not stop the service
            INTERNAL_ERRORS.record("chunk-service", exc)
            log.exception("chunk service: answering %s failed", message.topic)

    def _answer(self, topic: str, payload: bytes) -> None:
        device = topic.rsplit("/", 1)[-1]
        if not topics.is_valid_segment(device) or len(payload) > MAX_REQUEST_BYTES:
            self._refused()
            return
        try:
            request = ChunkRequest.model_validate_json(payload)
        except ValidationError as exc:
            log.warning("chunk service: a malformed request from %s: %s", device, str(exc).splitlines()[0])
            self._refused()
            return
        reply_topic = topics.file_reply_topic(device)
        try:
            manifest = self._manifest(request.bundle)
            described = manifest.file(request.file)
        except (ProvisioningError, StopIteration):
            self._refused()
            self._send(reply_topic, b"", bundle=request.bundle, file=request.file, error="unknown bundle or file")
            return
        sent = chunks = 0
        for index in request.chunks:
            if not 0 <= index < len(described.chunks):
                continue
            data = self.store.read_chunk(request.bundle, request.file, index * described.chunk_size,
                                         described.chunk_length(index))  # fmt: skip
            self._send(reply_topic, data, bundle=request.bundle, file=request.file, chunk=str(index))
            sent += len(data)
            chunks += 1
        with self._lock:
            self.counts.requests += 1
            self.counts.chunks += chunks
            self.counts.bytes += sent
            self.counts.devices.add(device)

    def _refused(self) -> None:
        with self._lock:
            self.counts.refused += 1

    def _load_manifest(self, bundle_id: str) -> BundleManifest:
        return self.store.manifest(bundle_id)

    def _send(self, topic: str, payload: bytes, **properties: str) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = list(properties.items())
        self._client.publish(topic, payload, qos=1, properties=props)

"""A client of the wire contract: publish JSON-RPC requests to a device and wait for the replies.

Used by ``edge-agent call``, ``edge-agent mcp-stdio``, the demo and the tests. Replies are matched to
requests by JSON-RPC id on the client's own reply topic ``mcp/res/{device}/{client}``.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections import deque
from concurrent.futures import Future

# Not the builtin TimeoutError before Python 3.11.
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import LocalBroker
from agent.errors import AgentError
from agent.mqtt import topics
from agent.mqtt.transport import configure_broker_access, connect_properties, new_client


class ReplyTimeout(AgentError):
    """No reply arrived before the caller's deadline."""


class DeviceClient:
    """A connected requester; thread-safe, with any number of requests in flight."""

    def __init__(
        self,
        broker: LocalBroker,
        device_id: str,
        client_id: str | None = None,
        *,
        connect_timeout: float = 10.0,
        session_expiry: int = 0,
    ) -> None:
        """Connect and subscribe to the reply topic.

        With ``session_expiry`` > 0 the broker keeps this client's subscription and queues its replies
        across disconnections (and broker restarts, with persistence), so no reply is missed.
        """
        self.device_id = device_id
        self.client_id = client_id or f"cli-{uuid.uuid4().hex[:12]}"
        self._ids = itertools.count(1)
        self._waiting: dict[Any, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.unmatched: deque[dict[str, Any]] = deque(maxlen=1000)
        self._mqtt = new_client(self.client_id)
        configure_broker_access(self._mqtt, broker)
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_subscribe = self._on_subscribe
        self._mqtt.on_message = self._on_message
        self._subscribe_refused: str | None = None
        try:
            self._mqtt.connect(
                broker.host,
                broker.port,
                keepalive=30,
                clean_start=session_expiry == 0,
                properties=connect_properties(session_expiry),
            )
        except OSError as exc:
            raise AgentError(f"cannot connect to {broker.host}:{broker.port}: {exc}") from None
        self._mqtt.loop_start()
        if not self._ready.wait(connect_timeout) or self._subscribe_refused:
            self.close()
            reason = self._subscribe_refused or "no answer"
            raise AgentError(f"could not subscribe to {self.reply_topic} on {broker.host}:{broker.port}: {reason}")

    @property
    def reply_topic(self) -> str:
        return topics.reply_topic(self.device_id, self.client_id)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.reply_topic, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if reasons and reasons[0].is_failure:
            self._subscribe_refused = str(reasons[0])
        self._ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            reply = json.loads(message.payload)
        except ValueError:
            return
        request_id = reply.get("id") if isinstance(reply, dict) else None
        with self._lock:
            future = self._waiting.pop(request_id, None)
            if future is None:
                self.unmatched.append(reply)
        if future is not None:
            future.set_result(reply)

    def send(self, method: str, params: dict[str, Any] | None = None, *, request_id: Any = None) -> Future[dict[str, Any]]:
        """Publish one request; the future resolves to the whole JSON-RPC reply."""
        request_id = request_id if request_id is not None else f"{self.client_id}-{next(self._ids)}"
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            self._waiting[request_id] = future
        self.publish_raw(json.dumps(request).encode())
        return future

    def publish_raw(self, payload: bytes, **kwargs: Any) -> mqtt.MQTTMessageInfo:
        """Publish arbitrary bytes on this client's request topic (tests send malformed requests)."""
        return self._mqtt.publish(topics.request_topic(self.device_id, self.client_id), payload, qos=1, **kwargs)

    def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30.0) -> dict[str, Any]:
        """Send a request and block for its reply."""
        request_id = f"{self.client_id}-{next(self._ids)}"
        future = self.send(method, params, request_id=request_id)
        try:
            return future.result(timeout)
        except FutureTimeout:
            with self._lock:
                self._waiting.pop(request_id, None)
            raise ReplyTimeout(f"no reply to {method} from device {self.device_id!r} within {timeout:.0f} s") from None

    def close(self) -> None:
        self._mqtt.disconnect()
        self._mqtt.loop_stop()

    def __enter__(self) -> "DeviceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

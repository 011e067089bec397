"""The local MQTT link's request side: what paho's network thread does with an incoming request, and how
replies are published and requests acknowledged.

The network thread sorts: topic and size checks, rate limits, memory shedding, an expiry stamp, and the
hand-off to the bounded intake queue, or an immediate signed refusal. A small request for a fast loaded model
that arrives while no worker is busy it serves itself (``_serves_inline``). A request's PUBACK goes out only
after the broker acknowledged its reply, in the order the requests arrived
(:class:`~agent.transport.AckSequencer`).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import topics
from agent.errors import (
    InvalidRequest,
    Overloaded,
    RateLimited,
    SigningError,
)
from agent.memory import MB
from agent.metrics import Rejection
from agent.outgoing import encode_reply
from agent.protocol import (
    RequestId,
    error_reply,
)
from agent.ratelimit import RateLimitRefusal
from agent.replay import payload_digest
from agent.transport import (
    publish_properties,
)

log = logging.getLogger(__name__)
_ID_PROBE_MAX_BYTES = 65_536
_ID_PROBE_HEAD_BYTES = 512
OFFLINE: dict[str, Any] = {"status": "offline"}
# Serving inline (LocalLinkMixin._serves_inline): small requests only, recognised from their head.
_INLINE_MAX_BYTES = 16_384
_INLINE_PROBE_BYTES = 1024
_METHOD = re.compile(rb'"method"\s*:\s*"([^"\\]{1,64})"')
_MODEL_NAME = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_TOOL_NAME = re.compile(rb'"name"\s*:\s*"([^"\\]{1,256})"')
_PREFERS_CLOUD = re.compile(rb'"prefer"\s*:\s*"cloud"')
_CHEAP_METHODS = frozenset({b"ping", b"models/list", b"initialize", b"tools/list"})
_MODEL_METHODS = frozenset({b"infer", b"tools/call"})
# The "id" member among the leading simple members of the top-level object (before any nested value).
_LEADING_ID = re.compile(rb'\s*\{(?:\s*"[^"\\]*"\s*:\s*(?:"(?:[^"\\]|\\.)*"|[-\w.]+)\s*,)*?\s*"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)\s*[,}]')



@dataclass
class InboundRequest:
    """A request as it arrived, before parsing."""

    client_id: str
    payload: bytes
    mid: int
    qos: int
    generation: int
    received: float
    expires: float | None
    response_topic: str | None
    correlation_data: bytes | None

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of the payload as received: the replay-cache key and the signed reply's request binding."""
        return payload_digest(self.payload)


@dataclass
class PendingReply:
    mid: int
    qos: int
    generation: int


class LocalLinkMixin:
    """Network-thread intake, reply publishing and ordered acknowledgements of :class:`agent.app.Agent`."""

    # ---- paho callbacks (network thread) --------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("local broker refused the connection: %s", reason)
            return
        log.info("connected to local broker (session present: %s)", flags.session_present)
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        client.subscribe(topics.request_filter(self.device_id), options=options)
        self._publish_identity_and_status()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if any(reason.is_failure for reason in reasons):
            log.error("subscription refused by the local broker: %s", reasons)
            return
        self._subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._acks.reset()
        if not self._stopped.is_set():
            log.warning("disconnected from local broker (%s); reconnecting", reason)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # paho calls this holding its outgoing-message lock, so nothing here may wait on a thread that is
        # inside client.publish(); _publish_lock is therefore never held across a paho call.
        with self._publish_lock:
            if mid in self._awaiting_puback:
                pending = self._awaiting_puback.pop(mid)
            else:
                self._early_pubacks.add(mid)
                pending = None
        if pending is not None:
            self._finish(pending.mid, pending.qos, pending.generation)
        with self._idle:
            self._idle.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        generation = self._acks.generation
        if message.qos > 0:
            self._acks.received(message.mid)
        client_id = topics.client_id_from_request_topic(message.topic, self.device_id)
        if client_id is None:
            self.count("ignored_topic")
            self._finish(message.mid, message.qos, generation)
            return
        if not self._accepting.is_set():
            # Not acknowledged: the broker keeps it in our session and redelivers it after a restart.
            return
        refusal = self.rate_limiter.check(client_id)
        if refusal is not None and self._refusal_replies.check(client_id) is not None:
            # The cheapest path, first: a flood's excess beyond the refusals it is answered (see below).
            self._count_refusal(refusal)
            self.count("rate_limited_unanswered")
            self._finish(message.mid, message.qos, generation)
            return
        props = message.properties
        now = time.monotonic()
        expiry = getattr(props, "MessageExpiryInterval", None)
        inbound = InboundRequest(
            client_id=client_id,
            payload=message.payload,
            mid=message.mid,
            qos=message.qos,
            generation=generation,
            received=now,
            expires=now + expiry if expiry is not None else None,
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
        )
        if len(message.payload) > self.settings.limits.max_payload_bytes:
            self.count("oversized")
            self._count_rejection("oversized")
            error = InvalidRequest(
                f"payload of {len(message.payload)} bytes exceeds the limit of {self.settings.limits.max_payload_bytes}"
            )
            self._reply(inbound, error_reply(None, error), to_default_topic=True)
            return
        if refusal is not None:
            self._refuse_rate_limited(inbound, refusal)
            return
        if self.memory_watchdog.should_shed():
            self.count("overloaded_memory")
            self._count_rejection("overloaded")
            error = Overloaded(
                f"agent memory {self.memory_watchdog.last_rss_bytes / MB:.0f} MB is above its soft limit of "
                f"{self.settings.limits.process_soft_limit_mb} MB; retry later"
            )
            self._reply(inbound, error_reply(_probe_request_id(inbound.payload), error))
            return
        inline = self._in_flight == 0 and self._serves_inline(inbound)
        with self._idle:
            # Counted before the hand-off: a worker that has taken a request off the queue but not yet
            # started on it still counts as busy, so the network thread never serves inline beside it.
            inline = inline and self._in_flight == 0
            self._in_flight += 1
        if inline:
            self.count("served_inline")
            self._serve_counted(inbound)
            return
        try:
            self._intake.put_nowait(inbound)
        except queue.Full:
            with self._idle:
                self._in_flight -= 1
            self.count("overloaded")
            self._count_rejection("overloaded")
            error = Overloaded(f"intake queue full ({self._intake.maxsize} waiting); retry later")
            self._reply(inbound, error_reply(_probe_request_id(inbound.payload), error))

    def _serves_inline(self, inbound: InboundRequest) -> bool:
        """Whether to serve a request on the network thread itself, skipping the worker hand-off.

        Only while no request is queued or being served (so it overtakes nothing and never waits for an
        inference slot a worker holds), only for small payloads, and only for methods that are cheap or name
        a loaded model whose runs average at most ``limits.inline_max_ms``: the network thread must never
        stall on a slow model, a model load or a cloud round trip. For a small model this saves most of
        the agent's per-request cost: two thread wake-ups and the GIL hand-offs between them. The method
        and model are read from the request's head without parsing it; a wrong guess costs only speed.
        """
        if not self._inline_allowed or len(inbound.payload) > _INLINE_MAX_BYTES:
            return False
        head = inbound.payload[:_INLINE_PROBE_BYTES]
        method = _METHOD.search(head)
        if method is None:
            return False
        if method.group(1) in _CHEAP_METHODS:
            return True
        if method.group(1) not in _MODEL_METHODS or _PREFERS_CLOUD.search(head) is not None:
            return False
        model = (_TOOL_NAME if method.group(1) == b"tools/call" else _MODEL_NAME).search(head)
        return model is not None and self.models.runs_within(
            model.group(1).decode("utf-8", "replace"), self.settings.limits.inline_max_ms
        )

    def _count_refusal(self, refusal: RateLimitRefusal) -> None:
        self.count(f"rate_limited_{refusal.scope}")
        self._count_rejection("rate_limited_client" if refusal.scope == "client" else "rate_limited_global")

    def _refuse_rate_limited(self, inbound: InboundRequest, refusal: RateLimitRefusal) -> None:
        """Answer a request over its client's or the global rate at once, without queueing it.

        Each refusal is a signed reply, so refusals are answered only at the client's own admitted rate;
        beyond that a flood's requests are acknowledged unanswered (in ``_on_message``, before any other
        work), so a flooder cannot buy the network thread.
        """
        retry_after_ms = max(1, math.ceil(refusal.retry_after_s * 1000))
        self._count_refusal(refusal)
        self.audit.record("rate_limited", client_id=inbound.client_id, scope=refusal.scope, retry_after_ms=retry_after_ms)
        error = RateLimited(
            f"rate limit exceeded ({refusal.scope}); retry after {retry_after_ms} ms",
            data={"retry_after_ms": retry_after_ms, "scope": refusal.scope},
        )
        self._reply(inbound, error_reply(_probe_request_id(inbound.payload), error))

    def _count_rejection(self, reason: Rejection) -> None:
        if self.metrics is not None:
            self.metrics.count_rejection(reason)

    # ---- replies and acknowledgements -----------------------------------------------------------

    def _reply(self, inbound: InboundRequest, reply: dict[str, Any], *, to_default_topic: bool = False) -> None:
        """Sign and publish a reply (one that gets no upstream copy)."""
        payload = self._encode(inbound, reply)
        if payload is not None:
            self._send(inbound, payload, to_default_topic=to_default_topic)

    def _encode(self, inbound: InboundRequest, reply: dict[str, Any]) -> bytes | None:
        """The signed reply bytes; None (request acknowledged, nothing sent) if signing failed."""
        try:
            return encode_reply(reply, self.signer, client_id=inbound.client_id, request_sha256=inbound.digest.hex())
        except SigningError as exc:
            # An unsigned answer would break the promise that every answer is signed; the client times out.
            log.error("could not sign the reply to %s, not answering: %s", inbound.client_id, exc)
            self.count("signing_failed")
            self._finish(inbound.mid, inbound.qos, inbound.generation)
            return None

    def _deliver(
        self, inbound: InboundRequest, payload: bytes, cache_key: tuple[str, RequestId, bytes] | None, *, committed: bool = False
    ) -> None:
        """Publish a served request's reply and remember it for repeats (runs on the outbox writer after a commit)."""
        if self._send(inbound, payload) and cache_key is not None:
            self.replies.store(*cache_key, payload)
        if committed:
            with self._idle:
                self._awaiting_commit -= 1
                self._idle.notify_all()

    def _send(self, inbound: InboundRequest, payload: bytes, *, to_default_topic: bool = False) -> bool:
        """Publish an encoded reply where ``inbound`` asked for it; acknowledges the request on PUBACK."""
        use_response_topic = inbound.response_topic is not None and not to_default_topic
        topic = inbound.response_topic if use_response_topic else topics.reply_topic(self.device_id, inbound.client_id)
        props = publish_properties(correlation_data=inbound.correlation_data if use_response_topic else None)
        pending = PendingReply(inbound.mid, inbound.qos, inbound.generation) if inbound.qos > 0 else None
        if not self._publish_tracked(topic, payload, pending, properties=props):
            self._finish(inbound.mid, inbound.qos, inbound.generation)
            return False
        return True

    def _publish_tracked(
        self, topic: str, payload: bytes | str, pending: PendingReply | None, *, retain: bool = False, properties: Any = None
    ) -> bool:
        """Publish at QoS 1; ``pending`` (a request to acknowledge) is finished when the broker's PUBACK arrives.

        Every QoS 1 publish goes through here so that each PUBACK finds its message id registered, even when
        it arrives before ``publish()`` has returned.
        """
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("could not publish to %s: %s", topic, mqtt.error_string(info.rc))
            return False
        with self._publish_lock:
            acknowledged_already = info.mid in self._early_pubacks
            if acknowledged_already:
                self._early_pubacks.discard(info.mid)
            else:
                self._awaiting_puback[info.mid] = pending
        if acknowledged_already and pending is not None:
            self._finish(pending.mid, pending.qos, pending.generation)
        return True

    def _finish(self, mid: int, qos: int, generation: int) -> None:
        if qos > 0:
            self._acks.done(mid, generation)


def _probe_request_id(payload: bytes) -> RequestId:
    """Best-effort id of a request that will not be parsed further, so the overload reply correlates.

    Runs on the network thread under overload, so it must stay cheap: an ``"id"`` member near the start
    (where clients put it) is read directly; otherwise only a small payload is parsed whole.
    """
    head = _LEADING_ID.match(payload[:_ID_PROBE_HEAD_BYTES])
    if head is not None:
        try:
            request_id = json.loads(head.group(1))
        except ValueError:
            return None
    elif len(payload) <= _ID_PROBE_MAX_BYTES:
        try:
            document = json.loads(payload)
        except ValueError:
            return None
        request_id = document.get("id") if isinstance(document, dict) else None
    else:
        return None
    return request_id if isinstance(request_id, (str, int)) and not isinstance(request_id, bool) else None


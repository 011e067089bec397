"""Serving one request, wherever it runs (a worker, or inline on the network thread): parse, check the
response topic, answer from the replay cache, forward to the cloud or run it, sign, and store the upstream
copy. It returns a :class:`Delivery`, what is to be published and when; it knows nothing about MQTT clients.

Every reply, refusals and relayed cloud answers included, is routed by :meth:`RequestPipeline.route`: to the
request's MQTT 5 Response Topic only when that stays within the client's own reply space, otherwise to
``mcp/res/{device}/{client}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from agent.config import Limits
from agent.errors import (
    InternalError,
    ModelTooLarge,
    RequestError,
    ResponseTopicRefused,
    SigningError,
)
from agent.exchange import InboundRequest, OutgoingReply
from agent.mqtt import topics
from agent.observe.audit import AuditTrail
from agent.serving.protocol import (
    InferParams,
    Request,
    RequestId,
    error_reply,
    parse_request,
    probe_request_id,
    result_reply,
    validate_params,
)
from agent.serving.replay import ReplayCache
from agent.serving.service import RequestService, Timing
from agent.signing import Signer
from agent.signing.outgoing import encode_reply
from agent.upstream.upstream import Upstream

if TYPE_CHECKING:
    from agent.serving.fallback import CloudFallback  # built by the app only for [cloud] fallback_models

log = logging.getLogger(__name__)
_CacheKey = tuple[str, RequestId, bytes]


class RequestObserver(Protocol):
    """Where a served request's outcome and timings are recorded (the metrics registry)."""

    def __call__(
        self, *, method: str | None, model: str | None, outcome: str, queue_s: float, inference_s: float | None,
        total_s: float,
    ) -> None: ...  # fmt: skip


# Not frozen: a frozen dataclass sets each field through object.__setattr__, ~0.4 us more per request.
@dataclass(slots=True)
class Delivery:
    """What serving a request came to: a reply to publish, or (``reply`` None) only an acknowledgement.

    With ``store``, the reply is published only from the callback ``store`` is given: its upstream copy is
    then on disk, so whatever a client was answered, the cloud will get. ``cache_key``: remember the reply
    for repeats once published.
    """

    inbound: InboundRequest
    reply: OutgoingReply | None = None
    store: Callable[[Callable[[], None]], None] | None = None
    cache_key: _CacheKey | None = None


class RequestPipeline:
    """Turns one inbound request into its :class:`Delivery`; safe to call from any number of threads."""

    def __init__(
        self,
        *,
        device_id: str,
        limits: Limits,
        service: RequestService,
        replies: ReplayCache,
        signer: Signer | None,
        upstream: Upstream | None,
        fallback: CloudFallback | None,
        audit: AuditTrail,
        count: Callable[[str], None],
        observe: RequestObserver,
    ) -> None:
        self.device_id = device_id
        self._limits = limits
        self._service = service
        self._replies = replies
        self._signer = signer
        self._upstream = upstream
        self._fallback = fallback
        self._audit = audit
        self._count = count
        self._observe = observe

    def serve(self, inbound: InboundRequest) -> Delivery:
        """Parse, check, run (or replay, or forward) and sign one request."""
        timing = Timing(received=inbound.received, started=time.monotonic())
        request: Request | None = None
        outcome = "internal_error"  # what an unexpected exception leaves it at
        topic_accepted = False  # the response topic was checked: its replies need not check it again
        try:
            if inbound.expires is not None and timing.started > inbound.expires:
                outcome = "expired"
                self._count("expired")
                return Delivery(inbound)
            limits = self._limits
            digest = inbound.digest if self._replies.enabled else b""
            try:
                request = parse_request(
                    inbound.payload, max_depth=limits.max_nesting_depth, max_values=limits.max_json_values
                )
                self._check_response_topic(inbound)
                topic_accepted = True
                cached = self._replies.lookup(inbound.client_id, request.id, digest)
                if cached is not None:
                    # The same signed bytes: they are bound to this very request, so they answer the repeat.
                    outcome = "replayed"
                    self._count("replayed")
                    return Delivery(inbound, self._addressed(inbound, cached, accepted=True))
                if self._forward_to_cloud(inbound, request, too_large=False):
                    outcome = "forwarded"
                    return Delivery(inbound)
                reply = result_reply(request.id, self._service.handle(request, timing, inbound.client_id))
                outcome = "ok"
            except ModelTooLarge as error:
                if self._forward_to_cloud(inbound, request, too_large=True):
                    outcome = "forwarded"
                    return Delivery(inbound)
                outcome = error.name
                self._count(f"error_{error.name}")
                reply = error_reply(request.id if request else None, error)
            except RequestError as error:
                outcome = error.name
                self._count(f"error_{error.name}")
                reply = error_reply(request.id if request else None, error)
                refused_topic = isinstance(error, ResponseTopicRefused)
                if refused_topic:
                    self._audit.record(
                        "response_topic_refused", client_id=inbound.client_id, topic=inbound.response_topic,
                        reason=error.message,
                    )  # fmt: skip
                if refused_topic or request is None:
                    return self.answer(inbound, reply, to_default_topic=refused_topic)
            if request.is_notification:
                return Delivery(inbound)
            if outcome == "ok":
                self._count("ok")
            payload = self._encode(inbound, reply)
            if payload is None:
                return Delivery(inbound)
            cache_key = (inbound.client_id, request.id, digest) if outcome == "ok" else None
            addressed = self._addressed(inbound, payload, accepted=topic_accepted)
            if self._upstream is None or not self._upstream.records(request.method):
                return Delivery(inbound, addressed, cache_key=cache_key)
            # The worker does not wait for the commit, so many replies share one fsync (group commit).
            store = partial(self._upstream.store_reply, inbound.client_id, request.method, payload)
            return Delivery(inbound, addressed, store=store, cache_key=cache_key)
        finally:
            self._observe(
                method=request.method if request is not None else None,
                model=_model_of(request),
                outcome=outcome,
                queue_s=timing.started - inbound.received,
                inference_s=timing.inference_ms / 1000 if timing.inference_ms else None,
                total_s=time.monotonic() - inbound.received,
            )

    def refusal(self, inbound: InboundRequest, error: RequestError, *, probe_id: bool, to_default_topic: bool) -> Delivery:
        """A signed refusal of a request that will not be parsed (admission, a full queue)."""
        request_id = probe_request_id(inbound.payload) if probe_id else None
        return self.answer(inbound, error_reply(request_id, error), to_default_topic=to_default_topic)

    def internal_error(self, inbound: InboundRequest) -> Delivery:
        """The reply for a request whose serving raised what nothing expected: a bug costs one reply.

        Its id is probed from the payload (as for refusals), so that the client can match the answer.
        """
        error = InternalError("internal error; see the agent log")
        return self.answer(inbound, error_reply(probe_request_id(inbound.payload), error))

    def answer(self, inbound: InboundRequest, reply: dict[str, Any], *, to_default_topic: bool = False) -> Delivery:
        """Sign ``reply`` (one that gets no upstream copy) and address it; acknowledge only if signing failed."""
        payload = self._encode(inbound, reply)
        if payload is None:
            return Delivery(inbound)
        return Delivery(inbound, self._addressed(inbound, payload, to_default_topic=to_default_topic))

    def remember(self, delivery: Delivery) -> None:
        """Keep a published reply for repeats of its request."""
        if delivery.cache_key is not None and delivery.reply is not None:
            self._replies.store(*delivery.cache_key, delivery.reply.payload)

    def route(self, inbound: InboundRequest, *, to_default_topic: bool = False) -> tuple[str, bytes | None]:
        """The topic (and correlation data) a reply to ``inbound`` goes to: the one validated route."""
        if inbound.response_topic is not None and not to_default_topic:
            if self._response_topic_allowed(inbound):
                return inbound.response_topic, inbound.correlation_data
            self._count("response_topic_refused")
        return topics.reply_topic(self.device_id, inbound.client_id), None

    def _addressed(
        self, inbound: InboundRequest, payload: bytes, *, to_default_topic: bool = False, accepted: bool = False
    ) -> OutgoingReply:
        """The reply, routed; ``accepted``: its request's response topic passed ``_check_response_topic``."""
        if accepted:
            if inbound.response_topic is not None:
                return OutgoingReply(inbound, inbound.response_topic, payload, inbound.correlation_data)
            return OutgoingReply(inbound, topics.reply_topic(self.device_id, inbound.client_id), payload)
        topic, correlation_data = self.route(inbound, to_default_topic=to_default_topic)
        return OutgoingReply(inbound, topic, payload, correlation_data)

    def _encode(self, inbound: InboundRequest, reply: dict[str, Any]) -> bytes | None:
        """The signed reply bytes; None (request acknowledged, nothing sent) if signing failed."""
        try:
            return encode_reply(reply, self._signer, client_id=inbound.client_id, request_sha256=inbound.digest.hex())
        except SigningError as exc:
            # An unsigned answer would break the promise that every answer is signed; the client times out.
            log.error("could not sign the reply to %s, not answering: %s", inbound.client_id, exc)
            self._count("signing_failed")
            return None

    def _forward_to_cloud(self, inbound: InboundRequest, request: Request | None, *, too_large: bool) -> bool:
        """Hand a request this device should not serve to the cloud; True once it is durably forwarded."""
        if self._fallback is None or request is None:
            return False
        if not self._fallback.wants(request, set(self._service.models.servable_ids), too_large=too_large):
            return False
        params = validate_params(InferParams, request.params)
        self._fallback.forward(inbound.client_id, request, params, inbound, len(inbound.payload))
        return True

    def _response_topic_allowed(self, inbound: InboundRequest) -> bool:
        limits = self._limits
        return (
            inbound.response_topic is not None
            and topics.response_topic_allowed(
                inbound.response_topic, self.device_id, inbound.client_id, limits.max_response_topic_bytes
            )
            and (inbound.correlation_data is None or len(inbound.correlation_data) <= limits.max_correlation_data_bytes)
        )

    def _check_response_topic(self, inbound: InboundRequest) -> None:
        if inbound.response_topic is None and inbound.correlation_data is None:
            return
        limits = self._limits
        if inbound.response_topic is not None and not topics.response_topic_allowed(
            inbound.response_topic, self.device_id, inbound.client_id, limits.max_response_topic_bytes
        ):
            self._count("response_topic_refused")
            raise ResponseTopicRefused(
                f"response topic must be {topics.reply_topic(self.device_id, inbound.client_id)} or below it, "
                f"without wildcards, at most {limits.max_response_topic_bytes} bytes"
            )
        if inbound.correlation_data is not None and len(inbound.correlation_data) > limits.max_correlation_data_bytes:
            self._count("response_topic_refused")
            raise ResponseTopicRefused(
                f"correlation data of {len(inbound.correlation_data)} bytes exceeds {limits.max_correlation_data_bytes}"
            )


def _model_of(request: Request | None) -> str | None:
    """The model a request names (``infer``: ``model``, ``tools/call``: ``name``), for metrics labels."""
    if request is None or not isinstance(request.params, dict):
        return None
    model = request.params.get("name" if request.method == "tools/call" else "model")
    return model if isinstance(model, str) else None

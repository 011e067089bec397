"""Serving one request, on a worker or inline on the network thread: parse, check, answer from the replay
cache, forward to the cloud or run it, then hand the signed reply to the upstream copy and the local link."""

from __future__ import annotations

import logging
import time

from agent import topics
from agent.errors import (
    InternalError,
    ModelTooLarge,
    RequestError,
    ResponseTopicRefused,
)
from agent.local_link import InboundRequest
from agent.protocol import (
    InferParams,
    Request,
    error_reply,
    parse_request,
    result_reply,
    validate_params,
)
from agent.service import Timing

log = logging.getLogger(__name__)


class RequestServingMixin:
    """The inference workers of :class:`agent.app.Agent`, and the serving they share with the network thread."""

    # ---- workers ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            inbound = self._intake.get()
            if inbound is None:
                return
            self._serve_counted(inbound)

    def _serve_counted(self, inbound: InboundRequest) -> None:
        """Serve one request counted in ``_in_flight`` (by whoever queued it, or the network thread inline)."""
        try:
            self._serve(inbound)
        except Exception:  # a bug must cost one reply, never the worker
            log.exception("unexpected error serving a request from %s", inbound.client_id)
            self._reply(inbound, error_reply(None, InternalError("internal error; see the agent log")))
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _serve(self, inbound: InboundRequest) -> None:
        timing = Timing(received=inbound.received, started=time.monotonic())
        request: Request | None = None
        outcome = "internal_error"  # what an unexpected exception leaves it at
        try:
            if inbound.expires is not None and timing.started > inbound.expires:
                outcome = "expired"
                self.count("expired")
                self._finish(inbound.mid, inbound.qos, inbound.generation)
                return
            limits = self.settings.limits
            digest = inbound.digest if self.replies.enabled else b""
            try:
                request = parse_request(
                    inbound.payload, max_depth=limits.max_nesting_depth, max_values=limits.max_json_values
                )
                self._check_response_topic(inbound)
                cached = self.replies.lookup(inbound.client_id, request.id, digest)
                if cached is not None:
                    # The same signed bytes: they are bound to this very request, so they answer the repeat.
                    outcome = "replayed"
                    self.count("replayed")
                    self._send(inbound, cached)
                    return
                if self._forward_to_cloud(inbound, request, too_large=False):
                    outcome = "forwarded"
                    return
                reply = result_reply(request.id, self.service.handle(request, timing))
                outcome = "ok"
            except ModelTooLarge as error:
                if self._forward_to_cloud(inbound, request, too_large=True):
                    outcome = "forwarded"
                    return
                outcome = error.name
                self.count(f"error_{error.name}")
                reply = error_reply(request.id if request else None, error)
            except RequestError as error:
                outcome = error.name
                self.count(f"error_{error.name}")
                reply = error_reply(request.id if request else None, error)
                refused_topic = isinstance(error, ResponseTopicRefused)
                if refused_topic:
                    self.audit.record(
                        "response_topic_refused", client_id=inbound.client_id, topic=inbound.response_topic,
                        reason=error.message,
                    )  # fmt: skip
                if refused_topic or request is None:
                    self._reply(inbound, reply, to_default_topic=refused_topic)
                    return
            if request.is_notification:
                self._finish(inbound.mid, inbound.qos, inbound.generation)
                return
            if outcome == "ok":
                self.count("ok")
            payload = self._encode(inbound, reply)
            if payload is None:
                return
            cache_key = (inbound.client_id, request.id, digest) if outcome == "ok" else None
            if self.upstream is None or not self.upstream.records(request.method):
                self._deliver(inbound, payload, cache_key)
                return
            # The client is answered only once the upstream copy is on disk; the worker does not wait for
            # that commit, so many replies share one fsync (group commit).
            with self._idle:
                self._awaiting_commit += 1
            stored = self.upstream.record_response(inbound.client_id, request.method, payload)
            stored.add_done_callback(lambda _: self._deliver(inbound, payload, cache_key, committed=True))
        finally:
            self._observe(inbound, request, outcome, timing)

    def _observe(self, inbound: InboundRequest, request: Request | None, outcome: str, timing: Timing) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_request(
            method=request.method if request is not None else None,
            model=_model_of(request),
            outcome=outcome,
            queue_s=timing.started - inbound.received,
            inference_s=timing.inference_ms / 1000 if timing.inference_ms else None,
            total_s=time.monotonic() - inbound.received,
        )

    def _forward_to_cloud(self, inbound: InboundRequest, request: Request | None, *, too_large: bool) -> bool:
        """Hand a request this device should not serve to the cloud; True once it is durably forwarded."""
        if self.fallback is None or request is None:
            return False
        if not self.fallback.wants(request, set(self.models.servable_ids), too_large=too_large):
            return False
        params = validate_params(InferParams, request.params)
        self.fallback.forward(inbound.client_id, request, params, inbound)
        self._finish(inbound.mid, inbound.qos, inbound.generation)
        return True

    def _check_response_topic(self, inbound: InboundRequest) -> None:
        limits = self.settings.limits
        if inbound.response_topic is not None and not topics.response_topic_allowed(
            inbound.response_topic, self.device_id, inbound.client_id, limits.max_response_topic_bytes
        ):
            self.count("response_topic_refused")
            raise ResponseTopicRefused(
                f"response topic must be {topics.reply_topic(self.device_id, inbound.client_id)} or below it, "
                f"without wildcards, at most {limits.max_response_topic_bytes} bytes"
            )
        if inbound.correlation_data is not None and len(inbound.correlation_data) > limits.max_correlation_data_bytes:
            self.count("response_topic_refused")
            raise ResponseTopicRefused(
                f"correlation data of {len(inbound.correlation_data)} bytes exceeds {limits.max_correlation_data_bytes}"
            )


def _model_of(request: Request | None) -> str | None:
    """The model a request names (``infer``: ``model``, ``tools/call``: ``name``), for metrics labels."""
    if request is None or not isinstance(request.params, dict):
        return None
    model = request.params.get("name" if request.method == "tools/call" else "model")
    return model if isinstance(model, str) else None



"""Where an admitted request waits and which thread **serves** it: the fair intake buffer, the inference
workers, the inline-serving decision, deadlines and the in-flight count.

The local link calls :meth:`Dispatcher.submit` on its network thread. A request is refused there
(:mod:`agent.serving.admission`; or its deadline is earlier than the expected wait), served at once on the
network thread when nothing waits and that is cheaper than a hand-off (``_serves_inline``), or queued in
the :class:`~agent.serving.intake.FairIntake` for one of ``limits.workers`` threads; a full intake sheds
from the client holding the most of it. Whatever serving comes to
(:class:`~agent.serving.pipeline.Delivery`) is published through the :class:`~agent.exchange.ReplyLink`:
at once, or from the outbox writer once the upstream copy is durable.

A request's deadline is the earlier of its MQTT 5 Message Expiry and ``params.timeout_ms`` (default
30 s); expected waits come from service times measured per method and model (:class:`ServiceCosts`).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from agent.config import Limits
from agent.errors import DeadlineUnmeetable, Overloaded, RequestError
from agent.exchange import InboundRequest, ReplyLink
from agent.faults import HEARTBEATS, INTERNAL_ERRORS, Where
from agent.models.streams import ArrivalOrder
from agent.observe.metrics import Rejection
from agent.serving.admission import Admission
from agent.serving.intake import CostKey, FairIntake, Queued
from agent.serving.pipeline import Delivery, RequestPipeline
from agent.serving.protocol import InferParams

# Serving inline: small requests only, recognised from their head.
_INLINE_MAX_BYTES = 16_384
_INLINE_PROBE_BYTES = 1024
_METHOD = re.compile(rb'"method"\s*:\s*"([^"\\]{1,64})"')
_MODEL_NAME = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_TOOL_NAME = re.compile(rb'"name"\s*:\s*"([^"\\]{1,256})"')
_PREFERS_CLOUD = re.compile(rb'"prefer"\s*:\s*"cloud"')
_CHEAP_METHODS = frozenset({b"ping", b"models/list", b"initialize", b"tools/list"})
_MODEL_METHODS = frozenset({b"infer", b"tools/call"})
_TIMEOUT_MEMBER = b'"timeout_ms"'
_TIMEOUT_VALUE = re.compile(rb'"timeout_ms"\s*:\s*(\d{1,9})\s*[,}]')
DEFAULT_TIMEOUT_MS: int = InferParams.model_fields["timeout_ms"].default


def _request_head(payload: bytes) -> CostKey:
    """The method and the model a request names, read from its head without parsing (None where not found)."""
    head = payload[:_INLINE_PROBE_BYTES]
    method = _METHOD.search(head)
    if method is None:
        return None, None
    if method.group(1) not in _MODEL_METHODS:
        return method.group(1), None
    model = (_TOOL_NAME if method.group(1) == b"tools/call" else _MODEL_NAME).search(head)
    return method.group(1), model.group(1) if model is not None else None


def timeout_ms_of(payload: bytes) -> int:
    """``params.timeout_ms`` as the request states it (the last such member), else the default.

    Searched from the end with ``rfind`` (memchr speed): clients put it after the inputs, and parsing a
    large request on the network thread to read one number would cost more than serving a small one.
    """
    at = payload.rfind(_TIMEOUT_MEMBER)
    if at < 0:
        return DEFAULT_TIMEOUT_MS
    value = _TIMEOUT_VALUE.match(payload, at)
    return max(1, int(value.group(1))) if value is not None else DEFAULT_TIMEOUT_MS


class ServiceCosts:
    """Measured service time per (method, model): an exponentially weighted mean, for at most ``max_keys``
    keys (model names come from clients, so the map is bounded; the least recently used key goes)."""

    def __init__(self, *, default_s: float = 0.005, max_keys: int = 256, weight: float = 0.2) -> None:
        self.default_s = default_s
        self.max_keys = max_keys
        self._weight = weight
        self._means: OrderedDict[CostKey, float] = OrderedDict()
        self._lock = threading.Lock()

    def estimate(self, key: CostKey) -> float:
        return self._means.get(key, self.default_s)

    def observe(self, key: CostKey, seconds: float) -> None:
        with self._lock:
            mean = self._means.get(key)
            self._means[key] = seconds if mean is None else mean + self._weight * (seconds - mean)
            self._means.move_to_end(key)
            if len(self._means) > self.max_keys:
                self._means.popitem(last=False)

    def __len__(self) -> int:
        return len(self._means)


class Dispatcher:
    """The fair intake and the worker threads that drain it; ``start()``, ``drain()``, ``stop()``."""

    def __init__(
        self,
        limits: Limits,
        pipeline: RequestPipeline,
        admission: Admission,
        link: ReplyLink,
        *,
        runs_within: Callable[[str, float], bool],
        unread_bytes: Callable[[], int],
        inline_allowed: bool,
        count: Callable[[str], None],
        count_rejection: Callable[[Rejection], None],
        arrivals: ArrivalOrder | None = None,
    ) -> None:
        self._limits = limits
        self._pipeline = pipeline
        self._admission = admission
        self._link = link
        self._runs_within = runs_within
        self._unread_bytes = unread_bytes
        self._inline_allowed = inline_allowed and limits.inline_max_ms > 0
        self._count = count
        self._count_rejection = count_rejection
        self._intake = FairIntake(
            max_requests=limits.intake_queue, max_bytes=limits.intake_max_bytes,
            parallelism=limits.max_concurrent_inferences, arrivals=arrivals,
        )  # fmt: skip
        self.costs = ServiceCosts()
        self._workers: list[threading.Thread] = []
        self._idle = threading.Condition()
        self._in_flight = 0  # requests waiting in the intake or being served
        self._awaiting_commit = 0  # replies waiting for their upstream copy to be durable

    # ---- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        for index in range(self._limits.workers):
            worker = threading.Thread(target=self._work, name=f"inference-worker-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def drain(self, deadline: float) -> None:
        """Wait (until the monotonic ``deadline``) for queued and in-flight requests and their commits."""
        with self._idle:
            while (self._in_flight or self._awaiting_commit) and time.monotonic() < deadline:
                self._idle.wait(0.05)

    def stop(self) -> None:
        """Stop the workers once they have finished what they serve; what still waits stays unacknowledged
        (the broker redelivers it after a restart)."""
        self._intake.close()
        for worker in self._workers:
            worker.join(timeout=5)

    @property
    def worker_count(self) -> int:
        return len(self._workers)

    def workers_alive(self) -> bool:
        return all(worker.is_alive() for worker in self._workers)

    def queue_depth(self) -> int:
        """Requests waiting in the intake."""
        return len(self._intake)

    def queued_bytes(self) -> int:
        return self._intake.figures().bytes

    def expected_wait_s(self) -> float:
        """The expected wait of a request of typical cost from a client with nothing queued."""
        return self._intake.expected_wait_s("", self.costs.default_s)

    # ---- intake (the local link's network thread) ---------------------------------------------------

    def submit(self, inbound: InboundRequest) -> None:
        """Refuse, serve inline, or queue one request the local link received; never raises.

        From here on the request is this dispatcher's: whatever goes wrong, it gets exactly one delivery
        (a -32603 reply for an unexpected exception), hence exactly one acknowledgement.
        """
        try:
            refusal = self._admission.check(inbound)
            key = _request_head(inbound.payload)
            inline = refusal is None and self._in_flight == 0 and self._serves_inline(inbound, key)
        except Exception as exc:  # nothing was delivered yet: the internal error is this request's one answer
            INTERNAL_ERRORS.record("intake", exc)
            self._deliver_safely(inbound, lambda: self._pipeline.internal_error(inbound))
            return
        if refusal is not None:
            if refusal.error is None:
                self._link.acknowledge(inbound)
            else:
                error = refusal.error
                self._deliver_safely(
                    inbound,
                    lambda: self._pipeline.refusal(
                        inbound, error, probe_id=refusal.probe_id, to_default_topic=refusal.to_default_topic
                    ),
                )
            return
        if inline:
            with self._idle:
                # Counted before serving: a worker that has just taken a request but not yet started on
                # it still counts as busy, so the network thread never serves inline beside it.
                inline = self._in_flight == 0
                self._in_flight += 1
            if inline:
                self._count("served_inline")
                self._serve_counted(inbound, key)
                return
            with self._idle:
                self._in_flight -= 1
        self._queue(inbound, key)

    def _queue(self, inbound: InboundRequest, key: CostKey) -> None:
        try:
            item = self._admit_by_deadline(inbound, key)
        except Exception as exc:  # before the hand-off to the intake: the internal error is its one answer
            INTERNAL_ERRORS.record("intake", exc)
            self._deliver_safely(inbound, lambda: self._pipeline.internal_error(inbound))
            return
        if item is None:
            return
        with self._idle:
            self._in_flight += 1
        shed = self._intake.offer(item)
        if shed:
            with self._idle:
                self._in_flight -= len(shed)
                self._idle.notify_all()
        for dropped in shed:
            try:
                self._shed(dropped)
            except Exception as exc:  # it is no longer queued: at least acknowledge it
                INTERNAL_ERRORS.record("intake", exc)
                self._link.acknowledge(dropped.inbound)

    def _admit_by_deadline(self, inbound: InboundRequest, key: CostKey) -> Queued | None:
        """The request to queue, or None when its deadline is earlier than the expected wait (refused)."""
        cost_s = self.costs.estimate(key)
        now = time.monotonic()
        deadline = inbound.received + timeout_ms_of(inbound.payload) / 1000
        if inbound.expires is not None:
            deadline = min(deadline, inbound.expires)
        inbound.expires = deadline
        wait_s = self._intake.expected_wait_s(inbound.client_id, cost_s, enough_s=deadline - now)
        if now + wait_s > deadline:
            self._count("deadline_unmeetable")
            self._count_rejection("deadline")
            error = DeadlineUnmeetable(
                f"the expected wait of {wait_s * 1000:.0f} ms exceeds this request's deadline "
                f"({max(0.0, deadline - now) * 1000:.0f} ms from now)",
                data={"expected_wait_ms": math.ceil(wait_s * 1000), "deadline_ms": max(0, int((deadline - now) * 1000))},
            )
            self._refuse(inbound, error)
            return None
        return Queued(inbound, cost_s, key)

    def _shed(self, dropped: Queued) -> None:
        self._count("overloaded")
        self._count_rejection("buffer_full")
        retry_after_ms = max(1, math.ceil(self._intake.expected_wait_s(dropped.inbound.client_id, 0.0) * 1000))
        error = Overloaded(
            f"intake full ({self._limits.intake_queue} requests, {self._limits.intake_max_bytes} bytes) and this "
            f"client holds the most of it; retry after {retry_after_ms} ms",
            data={"retry_after_ms": retry_after_ms},
        )
        self._refuse(dropped.inbound, error)

    def _refuse(self, inbound: InboundRequest, error: RequestError) -> None:
        """Answer a refusal within the client's refusal budget; beyond it, only acknowledge the request."""
        if not self._admission.may_answer_refusal(inbound.client_id):
            self._count("refused_unanswered")
            self._link.acknowledge(inbound)
            return
        self._deliver_safely(inbound, lambda: self._pipeline.refusal(inbound, error, probe_id=True, to_default_topic=False))

    def relay(self, inbound: InboundRequest, reply: dict[str, Any]) -> None:
        """Publish a cloud answer to a forwarded request (already acknowledged when it was forwarded)."""
        self._deliver(self._pipeline.answer(replace(inbound, qos=0), reply))

    def _serves_inline(self, inbound: InboundRequest, key: CostKey) -> bool:
        """Whether to serve a request on the network thread itself, skipping the worker hand-off.

        Only while no request is queued or being served (so it overtakes nothing and never waits for an
        inference slot a worker holds), only for small payloads, and only for methods that are cheap or name
        a loaded model whose runs average at most ``limits.inline_max_ms``: the network thread must never
        stall on a slow model, a model load or a cloud round trip. And only while the broker has not sent more
        than ``limits.inline_max_unread_bytes`` the network thread has yet to read: under a backlog it reads
        ahead, so that every client's requests reach the fair intake rather than queue at the broker. For a small model this saves most of
        the agent's per-request cost: two thread wake-ups and the GIL hand-offs between them. The method
        and model are read from the request's head without parsing it; a wrong guess costs only speed.
        """
        if not self._inline_allowed or len(inbound.payload) > _INLINE_MAX_BYTES:
            return False
        method, model = key
        if method is None:
            return False
        if method in _CHEAP_METHODS:
            return True
        if method not in _MODEL_METHODS or _PREFERS_CLOUD.search(inbound.payload[:_INLINE_PROBE_BYTES]) is not None:
            return False
        if model is None or not self._runs_within(model.decode("utf-8", "replace"), self._limits.inline_max_ms):
            return False
        # A backlog at the broker would wait there in arrival order while the network thread serves; read it
        # into the fair intake instead.
        return self._unread_bytes() <= self._limits.inline_max_unread_bytes

    # ---- serving (workers, or the network thread inline) --------------------------------------------

    def _work(self) -> None:
        name = threading.current_thread().name
        while True:
            item = self._intake.take()
            if item is None:
                return
            try:
                with HEARTBEATS.busy(name):
                    self._serve_counted(item.inbound, item.cost_key)
            finally:
                self._intake.finished(item)

    def _serve_counted(self, inbound: InboundRequest, key: CostKey) -> None:
        """Serve one request counted in ``_in_flight`` (by whoever queued it, or the network thread inline)."""
        started = time.monotonic()
        try:
            self._deliver_safely(inbound, lambda: self._pipeline.serve(inbound), where="worker")
            self.costs.observe(key, time.monotonic() - started)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _deliver_safely(
        self, inbound: InboundRequest, make: Callable[[], Delivery], where: Where = "intake"
    ) -> None:
        """Deliver what ``make`` produces; if it raises, a -32603 reply instead, or at least the acknowledgement.

        A bug must cost one reply, never the thread, and never leave the request unacknowledged: one
        unacknowledged request holds back the PUBACK of every later one.
        """
        try:
            delivery = make()
        except Exception as exc:
            INTERNAL_ERRORS.record(where, exc)
            try:
                delivery = self._pipeline.internal_error(inbound)
            except Exception as second:
                INTERNAL_ERRORS.record(where, second)
                delivery = Delivery(inbound)
        try:
            self._deliver(delivery)
        except Exception as exc:  # raised after the hand-off to the link, which acknowledged or will
            INTERNAL_ERRORS.record("reply", exc)

    def _deliver(self, delivery: Delivery) -> None:
        if delivery.reply is None:
            self._link.acknowledge(delivery.inbound)
        elif delivery.store is None:
            self._publish(delivery)
        else:
            with self._idle:
                self._awaiting_commit += 1
            try:
                delivery.store(lambda: self._publish_committed(delivery))
            except Exception:  # no copy was handed over: answer as when storing it fails (counted, published)
                self._publish_committed(delivery)
                raise

    def _publish(self, delivery: Delivery) -> None:
        assert delivery.reply is not None
        if self._link.publish_reply(delivery.reply):
            self._pipeline.remember(delivery)

    def _publish_committed(self, delivery: Delivery) -> None:
        """Publish a reply whose upstream copy is settled (runs on the outbox writer after its commit)."""
        try:
            with INTERNAL_ERRORS.guard("reply"):
                self._publish(delivery)
        finally:
            with self._idle:
                self._awaiting_commit -= 1
                self._idle.notify_all()

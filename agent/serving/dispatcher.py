"""Where an admitted request waits and which thread **serves** it: the intake queue, the inference workers,
the inline-serving decision and the in-flight count.

The local link calls :meth:`Dispatcher.submit` on its network thread. A request is refused there
(:mod:`agent.serving.admission`, or a full queue), served at once on the network thread when that is
cheaper than a hand-off (``_serves_inline``), or queued for one of ``limits.workers`` threads. Whatever
serving it comes to (:class:`~agent.serving.pipeline.Delivery`) is published through the
:class:`~agent.exchange.ReplyLink`: at once, or from the outbox writer once the upstream copy is durable.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from agent.config import Limits
from agent.errors import Overloaded
from agent.exchange import InboundRequest, ReplyLink
from agent.faults import HEARTBEATS, INTERNAL_ERRORS, Where
from agent.observe.metrics import Rejection
from agent.serving.admission import Admission
from agent.serving.pipeline import Delivery, RequestPipeline

log = logging.getLogger(__name__)
# Serving inline: small requests only, recognised from their head.
_INLINE_MAX_BYTES = 16_384
_INLINE_PROBE_BYTES = 1024
_METHOD = re.compile(rb'"method"\s*:\s*"([^"\\]{1,64})"')
_MODEL_NAME = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_TOOL_NAME = re.compile(rb'"name"\s*:\s*"([^"\\]{1,256})"')
_PREFERS_CLOUD = re.compile(rb'"prefer"\s*:\s*"cloud"')
_CHEAP_METHODS = frozenset({b"ping", b"models/list", b"initialize", b"tools/list"})
_MODEL_METHODS = frozenset({b"infer", b"tools/call"})


class Dispatcher:
    """The intake queue and the worker threads that drain it; ``start()``, ``drain()``, ``stop()``."""

    def __init__(
        self,
        limits: Limits,
        pipeline: RequestPipeline,
        admission: Admission,
        link: ReplyLink,
        *,
        runs_within: Callable[[str, float], bool],
        inline_allowed: bool,
        count: Callable[[str], None],
        count_rejection: Callable[[Rejection], None],
    ) -> None:
        self._limits = limits
        self._pipeline = pipeline
        self._admission = admission
        self._link = link
        self._runs_within = runs_within
        self._inline_allowed = inline_allowed and limits.inline_max_ms > 0
        self._count = count
        self._count_rejection = count_rejection
        self._intake: queue.Queue[InboundRequest | None] = queue.Queue(maxsize=limits.intake_queue)
        self._workers: list[threading.Thread] = []
        self._idle = threading.Condition()
        self._in_flight = 0  # requests queued for a worker or being served
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
            while (self._in_flight or self._awaiting_commit or not self._intake.empty()) and time.monotonic() < deadline:
                self._idle.wait(0.05)

    def stop(self) -> None:
        """Stop the workers once they have finished what they hold."""
        for _ in self._workers:
            self._intake.put(None)
        for worker in self._workers:
            worker.join(timeout=5)

    @property
    def worker_count(self) -> int:
        return len(self._workers)

    def workers_alive(self) -> bool:
        return all(worker.is_alive() for worker in self._workers)

    def queue_depth(self) -> int:
        return self._intake.qsize()

    # ---- intake (the local link's network thread) ---------------------------------------------------

    def submit(self, inbound: InboundRequest) -> None:
        """Refuse, serve inline, or queue one request the local link received; never raises.

        From here on the request is this dispatcher's: whatever goes wrong, it gets exactly one delivery
        (a -32603 reply for an unexpected exception), hence exactly one acknowledgement.
        """
        try:
            refusal = self._admission.check(inbound)
            inline = refusal is None and self._in_flight == 0 and self._serves_inline(inbound)
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
        with self._idle:
            # Counted before the hand-off: a worker that has taken a request off the queue but not yet
            # started on it still counts as busy, so the network thread never serves inline beside it.
            inline = inline and self._in_flight == 0
            self._in_flight += 1
        if inline:
            self._count("served_inline")
            self._serve_counted(inbound)
            return
        try:
            self._intake.put_nowait(inbound)
        except queue.Full:
            with self._idle:
                self._in_flight -= 1
            self._count("overloaded")
            self._count_rejection("overloaded")
            error = Overloaded(f"intake queue full ({self._intake.maxsize} waiting); retry later")
            self._deliver_safely(
                inbound, lambda: self._pipeline.refusal(inbound, error, probe_id=True, to_default_topic=False)
            )

    def relay(self, inbound: InboundRequest, reply: dict[str, Any]) -> None:
        """Publish a cloud answer to a forwarded request (already acknowledged when it was forwarded)."""
        self._deliver(self._pipeline.answer(replace(inbound, qos=0), reply))

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
        return model is not None and self._runs_within(
            model.group(1).decode("utf-8", "replace"), self._limits.inline_max_ms
        )

    # ---- serving (workers, or the network thread inline) --------------------------------------------

    def _work(self) -> None:
        name = threading.current_thread().name
        while True:
            inbound = self._intake.get()
            if inbound is None:
                return
            with HEARTBEATS.busy(name):
                self._serve_counted(inbound)

    def _serve_counted(self, inbound: InboundRequest) -> None:
        """Serve one request counted in ``_in_flight`` (by whoever queued it, or the network thread inline)."""
        try:
            self._deliver_safely(inbound, lambda: self._pipeline.serve(inbound), where="worker")
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
        elif delivery.stored is None:
            self._publish(delivery)
        else:
            with self._idle:
                self._awaiting_commit += 1
            delivery.stored.add_done_callback(lambda _: self._publish_committed(delivery))

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

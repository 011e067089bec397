"""Cloud fallback: requests this device cannot serve are forwarded through the outbox and answered from the cloud.

A request is forwarded when it names a model in ``[cloud] fallback_models`` that is not served here, or one
that can never fit this profile, or asks ``"prefer": "cloud"`` for a model in that catalogue. It goes into
the outbox class ``fallback`` (sent first, TTL = the request's ``timeout_ms``) and out on
``mcp/cloud/req/{device_id}``; the cloud answers on ``mcp/cloud/res/{device_id}`` with a JSON-RPC response
carrying the forwarded ``msg-id`` (MQTT 5 user property, or a ``msg_id`` member). The agent relays that answer
to the client, marked ``"served_by": "cloud"``. No answer before the deadline: the client gets -32007; a late
answer is dropped and counted. Forwarding is rate-limited per client so a device cannot amplify traffic.

The cloud is input too. An answer larger than ``fallback_max_answer_bytes``, nested deeper than
:data:`ANSWER_MAX_DEPTH`, or not a usable JSON-RPC response (see :func:`usable_answer`) is dropped and counted
*before* its pending request is touched, so that client still gets its -32007 at the deadline. The requests
waiting for the cloud are held in memory (their payload, for the signed binding and the reply route) up to
``fallback_max_pending_bytes``; beyond it new forwards are refused with -32001 and ``retry_after_ms``.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config import RateLimit
from agent.errors import Overloaded, RateLimited, RequestError, UpstreamTimeout
from agent.faults import INTERNAL_ERRORS
from agent.serving.protocol import InferParams, Request, check_shape, error_reply
from agent.serving.ratelimit import RateLimiter
from agent.upstream.uplink import CloudMessage

log = logging.getLogger(__name__)

# Deeper than any real answer needs, shallow enough that parsing, signing (JCS) and publishing never recurse far.
ANSWER_MAX_DEPTH = 64
# What a pending request costs besides its payload (the record, the heap entry, the dict slot), as the intake counts.
PENDING_OVERHEAD_BYTES = 512
# A refused forward is retried after the soonest deadline frees room, but no later than this: an answer may free it first.
RETRY_AFTER_MAX_S = 5.0


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def usable_answer(reply: Any) -> bool:
    """Whether a parsed cloud answer can be relayed: an object with an object ``result`` (whose ``_meta``, if
    any, is an object: the signature goes there) or an ``error`` object with an integer ``code``, a string
    ``message`` and, if any, an object ``data`` (the signature goes there)."""
    if not isinstance(reply, dict):
        return False
    result, error = reply.get("result"), reply.get("error")
    if isinstance(result, dict):
        return isinstance(result.get("_meta", {}), dict)
    return (
        isinstance(error, dict)
        and isinstance(error.get("code"), int)
        and not isinstance(error.get("code"), bool)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("data", {}), dict)
    )


@dataclass(order=True)
class _Pending:
    deadline: float
    msg_id: str = field(compare=False)
    request_id: Any = field(compare=False)
    context: Any = field(compare=False)
    held_bytes: int = field(compare=False)


class CloudFallback:
    """Forwards requests through ``enqueue`` and relays cloud answers through ``relay(context, reply)``."""

    def __init__(
        self,
        catalogue: list[str],
        enqueue: Callable[[dict[str, Any], float], str | None],
        relay: Callable[[Any, dict[str, Any]], None],
        count: Callable[[str], None],
        *,
        rate_per_s: float = 2.0,
        burst: int = 5,
        max_pending_bytes: int = 16 * 1024 * 1024,
        max_answer_bytes: int = 4 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalogue = frozenset(catalogue)
        self._enqueue = enqueue
        self._relay = relay
        self._count = count
        self._clock = clock
        self._rate_per_s = rate_per_s
        self._budget = RateLimiter(
            RateLimit(enabled=True, requests_per_s=rate_per_s, burst=burst, global_requests_per_s=rate_per_s * 64),
            clock=clock,
        )
        self._max_pending_bytes = max_pending_bytes
        self._max_answer_bytes = max_answer_bytes
        self._pending: dict[str, _Pending] = {}
        self._pending_bytes = 0
        self._deadlines: list[_Pending] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._timer = threading.Thread(target=self._expire_loop, name="fallback-deadlines", daemon=True)
        self._timer.start()

    def wants(self, request: Request, local_models: set[str], *, too_large: bool) -> bool:
        """Whether an ``infer`` request should go to the cloud instead of running here.

        ``too_large``: the local attempt found that the model can never fit this profile's memory budget.
        """
        if request.method != "infer" or not isinstance(request.params, dict):
            return False
        model = request.params.get("model")
        if not isinstance(model, str) or model not in self.catalogue:
            return False
        return request.params.get("prefer") == "cloud" or model not in local_models or too_large

    def forward(self, client_id: str, request: Request, params: InferParams, context: Any, held_bytes: int) -> None:
        """Store the request for the cloud; raises RequestError if it is refused here.

        ``held_bytes``: what keeping ``context`` until the answer costs (the request's payload).
        """
        now = self._clock()
        held_bytes += PENDING_OVERHEAD_BYTES
        refusal = self._budget.check(client_id)
        if refusal is not None:
            self._count("fallback_rate_limited")
            raise RateLimited(
                f"cloud fallback limited to {self._rate_per_s:g} requests/s per client; retry later",
                {"retry_after_ms": int(refusal.retry_after_s * 1000) + 1, "scope": refusal.scope},
            )
        # Reserved before the (slow) outbox write: workers forward concurrently, and a check made apart
        # from the reservation would let them all through together.
        self._reserve(held_bytes, now)
        timeout_s = params.timeout_ms / 1000
        body = {"client_id": client_id, "request": request.model_dump(exclude={"is_notification"})}
        msg_id = self._enqueue(body, timeout_s)
        if msg_id is None:
            with self._lock:
                self._pending_bytes -= held_bytes
            raise RequestError("cannot store the request for the cloud (outbox unavailable); see the agent log")
        pending = _Pending(now + timeout_s, msg_id, request.id, context, held_bytes)
        with self._lock:
            self._pending[msg_id] = pending
            heapq.heappush(self._deadlines, pending)
        self._count("fallback_forwarded")
        self._wake.set()

    def pending_bytes(self) -> int:
        """Bytes held for requests waiting for the cloud (payloads plus a fixed overhead each)."""
        with self._lock:
            return self._pending_bytes

    def _reserve(self, held_bytes: int, now: float) -> None:
        with self._lock:
            if self._pending_bytes + held_bytes <= self._max_pending_bytes:
                self._pending_bytes += held_bytes
                return
            soonest = self._deadlines[0].deadline - now if self._deadlines else 0.0
        self._count("fallback_over_budget")
        raise Overloaded(
            "too many bytes of requests are waiting for the cloud; retry later",
            {"retry_after_ms": int(min(max(soonest, 0.0), RETRY_AFTER_MAX_S) * 1000) + 1, "scope": "fallback"},
        )

    def _take(self, msg_id: str) -> _Pending | None:
        with self._lock:
            pending = self._pending.pop(msg_id, None)
            if pending is not None:
                self._pending_bytes -= pending.held_bytes
            return pending

    def on_cloud_message(self, message: CloudMessage) -> None:
        """Handle an answer on ``mcp/cloud/res/{device_id}`` (uplink thread: must not block).

        Everything about the answer is checked before its pending request is taken: an unusable answer is
        dropped and the request still gets its -32007 at the deadline.
        """
        if len(message.payload) > self._max_answer_bytes:
            self._count("fallback_bad_answer")
            return
        try:
            check_shape(message.payload, max_depth=ANSWER_MAX_DEPTH, max_values=None)
            reply = json.loads(message.payload, parse_constant=_refuse_constant)
        except (RequestError, ValueError, RecursionError):  # ValueError covers bad UTF-8 and over-long integers
            self._count("fallback_bad_answer")
            return
        if not usable_answer(reply):
            self._count("fallback_bad_answer")
            return
        msg_id = message.user_properties.get("msg-id") or reply.get("msg_id")
        pending = self._take(msg_id) if isinstance(msg_id, str) else None
        if pending is None:
            self._count("fallback_late_or_unknown")
            return
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": pending.request_id}
        if isinstance(reply.get("result"), dict):
            answer["result"] = {**reply["result"], "served_by": "cloud"}
        else:
            answer["error"] = reply["error"]
        self._count("fallback_answered")
        self._relay(pending.context, answer)

    def _expire_loop(self) -> None:
        while not self._stopping:
            with INTERNAL_ERRORS.guard("fallback_expiry"):
                self._expire_round()

    def _expire_round(self) -> None:
        """Wait for the next deadline (or a wake-up), then answer every request whose deadline passed."""
        with self._lock:
            next_deadline = self._deadlines[0].deadline if self._deadlines else None
        timeout = None if next_deadline is None else max(0.0, next_deadline - self._clock())
        self._wake.wait(timeout)
        self._wake.clear()
        now = self._clock()
        expired: list[_Pending] = []
        with self._lock:
            while self._deadlines and self._deadlines[0].deadline <= now:
                pending = heapq.heappop(self._deadlines)
                if self._pending.pop(pending.msg_id, None) is not None:
                    self._pending_bytes -= pending.held_bytes
                    expired.append(pending)
        for pending in expired:
            self._count("fallback_timed_out")
            error = UpstreamTimeout("the cloud did not answer before the request's deadline (timeout_ms)")
            with INTERNAL_ERRORS.guard("fallback_expiry"):  # one failed answer must not cost the others theirs
                self._relay(pending.context, error_reply(pending.request_id, error))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._timer.join(timeout=2)


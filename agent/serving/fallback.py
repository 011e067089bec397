"""Cloud fallback: requests this device cannot serve are forwarded through the outbox and answered from the cloud.

A request is forwarded when it names a model in ``[cloud] fallback_models`` that is not served here, or one
that can never fit this profile, or asks ``"prefer": "cloud"`` for a model in that catalogue. It goes into
the outbox class ``fallback`` (sent first, TTL = the request's ``timeout_ms``) and out on
``mcp/cloud/req/{device_id}``; the cloud answers on ``mcp/cloud/res/{device_id}`` with a JSON-RPC response
carrying the forwarded ``msg-id`` (MQTT 5 user property, or a ``msg_id`` member). The agent relays that answer
to the client, marked ``"served_by": "cloud"``. No answer before the deadline: the client gets -32007; a late
answer is dropped and counted. Forwarding is rate-limited per client so a device cannot amplify traffic.
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
from agent.errors import RateLimited, RequestError, UpstreamTimeout
from agent.serving.protocol import InferParams, Request, error_reply
from agent.serving.ratelimit import RateLimiter
from agent.upstream.uplink import CloudMessage

log = logging.getLogger(__name__)


@dataclass(order=True)
class _Pending:
    deadline: float
    msg_id: str = field(compare=False)
    request_id: Any = field(compare=False)
    context: Any = field(compare=False)


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalogue = frozenset(catalogue)
        self._enqueue = enqueue
        self._relay = relay
        self._count = count
        self._clock = clock
        self._rate_per_s = rate_per_s
        self._budget = RateLimiter(
            RateLimit(requests_per_s=rate_per_s, burst=burst, global_requests_per_s=rate_per_s * 64), clock=clock
        )
        self._pending: dict[str, _Pending] = {}
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

    def forward(self, client_id: str, request: Request, params: InferParams, context: Any) -> None:
        """Store the request for the cloud; raises RequestError if it is refused here."""
        now = self._clock()
        refusal = self._budget.check(client_id)
        if refusal is not None:
            self._count("fallback_rate_limited")
            raise RateLimited(
                f"cloud fallback limited to {self._rate_per_s:g} requests/s per client; retry later",
                {"retry_after_ms": int(refusal.retry_after_s * 1000) + 1, "scope": refusal.scope},
            )
        timeout_s = params.timeout_ms / 1000
        body = {"client_id": client_id, "request": request.model_dump(exclude={"is_notification"})}
        msg_id = self._enqueue(body, timeout_s)
        if msg_id is None:
            raise RequestError("cannot store the request for the cloud (outbox unavailable); see the agent log")
        pending = _Pending(now + timeout_s, msg_id, request.id, context)
        with self._lock:
            self._pending[msg_id] = pending
            heapq.heappush(self._deadlines, pending)
        self._count("fallback_forwarded")
        self._wake.set()

    def on_cloud_message(self, message: CloudMessage) -> None:
        """Handle an answer on ``mcp/cloud/res/{device_id}`` (uplink thread: must not block)."""
        try:
            reply = json.loads(message.payload)
        except (ValueError, RecursionError):  # json raises RecursionError on deep nesting, not ValueError
            self._count("fallback_bad_answer")
            return
        msg_id = message.user_properties.get("msg-id") or (reply.get("msg_id") if isinstance(reply, dict) else None)
        with self._lock:
            pending = self._pending.pop(msg_id, None) if isinstance(msg_id, str) else None
        if pending is None or not isinstance(reply, dict):
            self._count("fallback_late_or_unknown")
            return
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": pending.request_id}
        if isinstance(reply.get("result"), dict):
            answer["result"] = {**reply["result"], "served_by": "cloud"}
        elif isinstance(reply.get("error"), dict):
            answer["error"] = reply["error"]
        else:
            self._count("fallback_bad_answer")
            answer["error"] = {"code": -32603, "message": "the cloud answered with neither result nor error"}
        self._count("fallback_answered")
        self._relay(pending.context, answer)

    def _expire_loop(self) -> None:
        while not self._stopping:
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
                        expired.append(pending)
            for pending in expired:
                self._count("fallback_timed_out")
                error = UpstreamTimeout("the cloud did not answer before the request's deadline (timeout_ms)")
                self._relay(pending.context, error_reply(pending.request_id, error))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._timer.join(timeout=2)


"""The load generator: one MQTT client keeping N JSON-RPC requests in flight at QoS 1, run as its own process.

``python -m benchmarks.load --host H --port P --device D --inflight N --duration S --payload FILE``
prints one JSON object: completed, errors, lost, req_per_s, p50_ms, p99_ms, p999_ms, ...

Closed loop by default: each reply (or error reply) sends the next request, so ``inflight`` requests are
always outstanding. With ``--rate R`` requests leave on a fixed schedule instead (at most ``inflight`` at
once): a well-behaved client whose latency does not depend on its own sending.

The payload FILE holds a request without ``id`` (``{"method": ..., "params": ...}``); the id is spliced in
per request. Replies are matched by the integer id read from the head of the reply, so a large reply (a
face detector's 15k floats) is never parsed here: the generator must not be what limits the measurement.
Only completions inside the measured window (after ``--warmup``) count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from agent.mqtt import topics
from agent.mqtt.transport import new_client

_REPLY_ID = re.compile(rb'"id":\s*(\d+)')
_REPLY_HEAD_BYTES = 96
_ID_MARK = "__BENCH_ID__"


def request_template(request: dict[str, Any]) -> tuple[bytes, bytes]:
    """The bytes before and after the id of a compact JSON-RPC request, id placed early like clients do."""
    document = {"jsonrpc": "2.0", "id": _ID_MARK, **request}
    before, after = json.dumps(document, separators=(",", ":")).split(f'"{_ID_MARK}"')
    return before.encode(), after.encode()


class LoadGenerator:
    """One connected requester; ``run()`` returns the statistics of one measured window."""

    def __init__(
        self, host: str, port: int, device: str, request: dict[str, Any], *, inflight: int, rate: float | None,
        abandon_after: float | None = None
    ) -> None:
        self.client_id = f"load-{uuid.uuid4().hex[:10]}"
        self.inflight = inflight
        self.rate = rate
        # An open-loop flooder gives up on unanswered requests, so an agent that leaves some unanswered
        # cannot slow the flood down by filling its in-flight window.
        self.abandon_after = abandon_after
        self._before, self._after = request_template(request)
        self._request_topic = topics.request_topic(device, self.client_id)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._sent: dict[int, float] = {}
        self._done: list[tuple[float, float, bool]] = []  # (sent, received, ok)
        self._reasons: Counter[str] = Counter()
        self._signed = 0
        self._reply_bytes = 0
        self._stopping = False
        self._drained = threading.Event()
        self._subscribed = threading.Event()
        self._client = new_client(self.client_id)
        # Requests awaiting the broker's PUBACK are capped by paho at 20 unless raised.
        self._client.max_inflight_messages_set(max(20, inflight * 2))
        self._client.max_queued_messages_set(0)
        self._client.on_connect = lambda c, u, f, r, p: c.subscribe(topics.reply_topic(device, self.client_id), qos=1)
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_message = self._on_reply
        self._client.connect(host, port, keepalive=60)

    def _send(self) -> None:
        request_id = next(self._ids)
        with self._lock:
            self._sent[request_id] = time.perf_counter()
        self._client.publish(self._request_topic, b"%s%d%s" % (self._before, request_id, self._after), qos=1)

    def _on_reply(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received = time.perf_counter()
        payload = message.payload
        match = _REPLY_ID.search(payload, 0, _REPLY_HEAD_BYTES)
        if match is None:
            document = json.loads(payload)
            request_id = document.get("id") if isinstance(document, dict) else None
        else:
            request_id = int(match.group(1))
        with self._lock:
            sent = self._sent.pop(request_id, None) if isinstance(request_id, int) else None
            outstanding = len(self._sent)
        if sent is None:
            self._reasons["unmatched_reply"] += 1
            return
        # An error reply has a top-level "error" object and no "result"; an echoed request has neither.
        ok = b'"result":' in payload or b'"error":{' not in payload
        if not ok:
            reason = json.loads(payload).get("error", {}).get("data", {}).get("reason", "unknown")
            self._reasons[reason] += 1
        self._signed += b'"sig":' in payload
        self._reply_bytes += len(payload)
        self._done.append((sent, received, ok))
        if self._stopping:
            if outstanding == 0:
                self._drained.set()
        elif self.rate is None:
            self._send()

    def run(self, duration: float, warmup: float, grace: float) -> dict[str, Any]:
        cpu_started = time.process_time()
        self._client.loop_start()
        try:
            if not self._subscribed.wait(10):
                raise SystemExit("load generator: could not subscribe to its reply topic")
            start = time.perf_counter()
            window_start = start + warmup
            window_end = window_start + duration
            if self.rate is None:
                for _ in range(self.inflight):
                    self._send()
                time.sleep(max(0.0, window_end - time.perf_counter()))
            else:
                self._paced(start, window_end)
            with self._lock:
                self._stopping = True
                if not self._sent:
                    self._drained.set()
            self._drained.wait(grace)
            with self._lock:
                lost = sum(1 for sent in self._sent.values() if sent < window_end)
        finally:
            self._client.disconnect()
            self._client.loop_stop()
        statistics = self._statistics(window_start, window_end, lost)
        cpu_us = (time.process_time() - cpu_started) * 1e6
        statistics["client_cpu_us_per_reply"] = round(cpu_us / max(1, len(self._done)), 1)
        return statistics

    def _paced(self, start: float, end: float) -> None:
        interval = 1.0 / self.rate  # type: ignore[operator]
        for step in itertools.count():
            due = start + step * interval
            if due >= end:
                return
            time.sleep(max(0.0, due - time.perf_counter()))
            with self._lock:
                if self.abandon_after is not None:
                    cutoff = time.perf_counter() - self.abandon_after
                    stale = [request_id for request_id, sent in self._sent.items() if sent < cutoff]
                    for request_id in stale:
                        del self._sent[request_id]
                    self._reasons["abandoned_unanswered"] += len(stale)
                busy = len(self._sent) >= self.inflight
            if busy:
                self._reasons["skipped_send_at_inflight_cap"] += 1
            else:
                self._send()

    def _statistics(self, window_start: float, window_end: float, lost: int) -> dict[str, Any]:
        in_window = [(sent, received, ok) for sent, received, ok in self._done if window_start <= received < window_end]
        latencies = np.array([(received - sent) * 1000 for sent, received, ok in in_window if ok])
        completed = len(latencies)
        duration = window_end - window_start
        replies = max(1, len(self._done))

        def percentile(q: float) -> float | None:
            return round(float(np.percentile(latencies, q)), 3) if completed else None

        return {
            "inflight": self.inflight,
            "rate": self.rate,
            "duration_s": round(duration, 3),
            "completed": completed,
            "errors": len(in_window) - completed + lost,
            "lost": lost,
            "req_per_s": round(completed / duration, 1),
            "p50_ms": percentile(50),
            "p99_ms": percentile(99),
            "p999_ms": percentile(99.9),
            "mean_ms": round(float(latencies.mean()), 3) if completed else None,
            "max_ms": round(float(latencies.max()), 3) if completed else None,
            "replies_total": len(self._done),
            "error_reasons": dict(self._reasons),
            "signed_fraction": round(self._signed / replies, 3),
            "mean_reply_bytes": round(self._reply_bytes / replies),
            "cpus": sorted(os.sched_getaffinity(0)),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--payload", type=Path, required=True, help="JSON request without id: method and params")
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--rate", type=float, help="send on a fixed schedule of this many requests/s, not in a closed loop")
    parser.add_argument("--abandon-after", type=float, help="with --rate: give up on a request unanswered after S seconds")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds to wait for outstanding replies at the end")
    args = parser.parse_args(argv)
    request = json.loads(args.payload.read_text())
    generator = LoadGenerator(
        args.host, args.port, args.device, request, inflight=args.inflight, rate=args.rate, abandon_after=args.abandon_after
    )
    json.dump(generator.run(args.duration, args.warmup, args.grace), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

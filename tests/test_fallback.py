"""CloudFallback's own bounds: bytes held for pending requests, and cloud answers checked before they are used."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from agent.errors import Overloaded
from agent.serving.fallback import CloudFallback
from agent.serving.protocol import InferParams, Request
from agent.upstream.uplink import CloudMessage

MB = 1024 * 1024


class Harness:
    """A fallback whose outbox is a list and whose relayed answers are collected."""

    def __init__(self, **options: Any) -> None:
        self.forwarded: list[dict[str, Any]] = []
        self.relayed: dict[Any, dict[str, Any]] = {}
        self.counts: Counter[str] = Counter()
        self._relayed = threading.Condition()
        self.fallback = CloudFallback(
            ["big"], self._enqueue, self._relay, lambda name: self.counts.update([name]), burst=1000, **options
        )

    def _enqueue(self, body: dict[str, Any], ttl_s: float) -> str:
        self.forwarded.append(body)
        return f"m{len(self.forwarded)}"

    def _relay(self, context: Any, reply: dict[str, Any]) -> None:
        with self._relayed:
            self.relayed[context] = reply
            self._relayed.notify_all()

    def forward(self, request_id: int, held_bytes: int = 1000, timeout_ms: int = 60_000) -> None:
        params = {"model": "big", "inputs": {}, "timeout_ms": timeout_ms}
        request = Request(jsonrpc="2.0", id=request_id, method="infer", params=params)
        self.fallback.forward("alice", request, InferParams(**params), request_id, held_bytes)

    def answer(self, msg_id: str, payload: bytes) -> None:
        self.fallback.on_cloud_message(CloudMessage(topic="t", payload=payload, user_properties={"msg-id": msg_id}))

    def wait_relayed(self, context: Any) -> dict[str, Any]:
        with self._relayed:
            assert self._relayed.wait_for(lambda: context in self.relayed, 30)
            return self.relayed[context]


@pytest.fixture
def harness() -> Iterator[Harness]:
    made = Harness(max_pending_bytes=3 * MB, max_answer_bytes=64 * 1024)
    yield made
    made.fallback.stop()


def test_pending_bytes_are_bounded_and_freed_by_an_answer(harness: Harness) -> None:
    harness.forward(1, held_bytes=MB)
    harness.forward(2, held_bytes=MB)
    with pytest.raises(Overloaded) as refused:
        harness.forward(3, held_bytes=MB + 600_000)
    assert refused.value.code == -32001 and refused.value.data["retry_after_ms"] > 0
    assert harness.counts["fallback_over_budget"] == 1 and len(harness.forwarded) == 2
    harness.answer("m1", json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"ok": 1}}).encode())
    assert harness.relayed[1]["result"] == {"ok": 1, "served_by": "cloud"}
    harness.forward(3, held_bytes=MB)
    assert harness.fallback.pending_bytes() == 2 * (MB + 512)


UNUSABLE = [
    b"[1, 2, 3]",
    b'"just a string"',
    json.dumps({"result": {"_meta": [1]}}).encode(),
    json.dumps({"result": {"_meta": "x"}}).encode(),
    json.dumps({"error": {"code": 1, "message": "m", "data": [1]}}).encode(),
    json.dumps({"error": {"code": "1", "message": "m"}}).encode(),
    json.dumps({"error": "no"}).encode(),
    json.dumps({"neither": 1}).encode(),
    b'{"result": ' + b"[" * 600 + b"]" * 600 + b"}",
    b'{"result": {"x": NaN}}',
    b'{"result": {"x": ' + b"1" * 5000 + b"}}",
    b'{"result": {"x": "' + b"a" * 70_000 + b'"}}',
    b"\xff\xfe not utf-8",
    b"{",
]


@pytest.mark.parametrize("payload", UNUSABLE, ids=range(len(UNUSABLE)))
def test_an_unusable_answer_leaves_the_request_to_its_timeout(harness: Harness, payload: bytes) -> None:
    harness.forward(7, timeout_ms=500)
    harness.answer("m1", payload)
    assert harness.counts["fallback_bad_answer"] == 1
    assert harness.wait_relayed(7)["error"]["code"] == -32007
    assert harness.fallback.pending_bytes() == 0


def test_an_error_answer_with_object_data_is_relayed(harness: Harness) -> None:
    harness.forward(8)
    harness.answer("m1", json.dumps({"error": {"code": -32000, "message": "busy", "data": {"why": "x"}}}).encode())
    assert harness.relayed[8]["error"] == {"code": -32000, "message": "busy", "data": {"why": "x"}}

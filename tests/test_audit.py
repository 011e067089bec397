"""The audit trail: events logged and stored in a real outbox's audit class; client-caused ones throttled."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.observe.audit import AuditEvent, AuditTrail
from agent.upstream.outbox import Outbox


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    store = Outbox(tmp_path / "outbox.db")
    yield store
    store.close()


def to_outbox(outbox: Outbox):
    def sink(event: AuditEvent) -> None:
        outbox.enqueue("audit", event.model_dump_json().encode())

    return sink


def stored_events(outbox: Outbox) -> list[dict]:
    return [json.loads(record.body) for record in outbox.claim_batch(100) if record.cls == "audit"]


def test_events_are_logged_and_stored_upstream(outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    trail = AuditTrail("dev1", to_outbox(outbox))
    with caplog.at_level(logging.INFO, logger="agent.observe.audit"):
        trail.record("signing_key_rotated", serial="0x1f", not_after="2030-01-01T00:00:00Z")
        trail.record("response_topic_refused", client_id="mallory", topic="mcp/res/dev1/alice")
        trail.close()
    stored = stored_events(outbox)
    assert [(event["kind"], event["client_id"]) for event in stored] == [
        ("signing_key_rotated", None),
        ("response_topic_refused", "mallory"),
    ]
    assert stored[1]["detail"] == {"topic": "mcp/res/dev1/alice"} and stored[1]["device_id"] == "dev1"
    levels = {record.audit["kind"]: record.levelno for record in caplog.records}
    assert levels == {"signing_key_rotated": logging.INFO, "response_topic_refused": logging.WARNING}


def test_rate_limit_events_are_throttled_per_client_with_a_suppressed_count(outbox: Outbox) -> None:
    clock = ManualClock()
    trail = AuditTrail("dev1", to_outbox(outbox), client_interval_s=60.0, clock=clock)
    results = [trail.record("rate_limited", client_id="flooder", retry_after_ms=50) for _ in range(500)]
    assert sum(result is not None for result in results) == 1
    assert trail.record("rate_limited", client_id="other", retry_after_ms=50) is not None
    clock.now += 59.9
    assert trail.record("rate_limited", client_id="flooder") is None
    clock.now += 0.1
    later = trail.record("rate_limited", client_id="flooder")
    assert later is not None and later.suppressed == 500
    trail.close()
    assert [(event["client_id"], event["suppressed"]) for event in stored_events(outbox)] == [
        ("flooder", 0),
        ("other", 0),
        ("flooder", 500),
    ]


def test_events_not_caused_by_clients_are_never_throttled() -> None:
    trail = AuditTrail("dev1", None)
    assert all(trail.record("model_swapped", model="iris", old="1", new="2") is not None for _ in range(50))


def test_throttles_are_bounded() -> None:
    trail = AuditTrail("dev1", None, max_tracked=10, clock=ManualClock())
    for n in range(1000):
        trail.record("rate_limited", client_id=f"client-{n}")
    assert trail.tracked == 10
    assert trail.record("rate_limited", client_id="client-999") is None
    assert trail.record("rate_limited", client_id="client-0") is not None  # forgotten: reported again


def test_a_blocked_sink_never_blocks_the_caller_and_overflow_is_counted() -> None:
    release = threading.Event()
    delivered: list[str] = []

    def slow_sink(event: AuditEvent) -> None:
        release.wait()
        delivered.append(event.kind)

    trail = AuditTrail("dev1", slow_sink, queue_size=4)
    for n in range(20):
        trail.record("model_swapped", model=f"m{n}")
    # One event is being delivered, four wait in the queue; the rest were dropped without waiting.
    assert 15 <= trail.dropped <= 16
    release.set()
    trail.close()
    assert len(delivered) == 20 - trail.dropped


def test_a_failing_sink_costs_only_that_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    closed = Outbox(tmp_path / "closed.db")
    closed.close()
    stored: list[str] = []

    def sink(event: AuditEvent) -> None:
        if event.detail.get("model") == "broken":
            closed.enqueue("audit", b"{}")
        stored.append(event.detail["model"])

    trail = AuditTrail("dev1", sink)
    with caplog.at_level(logging.ERROR, logger="agent.observe.audit"):
        trail.record("model_swapped", model="broken")
        trail.record("model_swapped", model="fine")
        trail.close()
    assert stored == ["fine"]
    assert any("not sent upstream" in record.getMessage() and "closed" in record.getMessage() for record in caplog.records)


def test_events_after_close_are_only_logged(outbox: Outbox) -> None:
    trail = AuditTrail("dev1", to_outbox(outbox))
    trail.record("model_swapped", model="before")
    trail.close()
    assert trail.record("model_swapped", model="after") is not None
    trail.close()
    assert [event["detail"]["model"] for event in stored_events(outbox)] == ["before"]

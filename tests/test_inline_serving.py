"""Small requests for fast loaded models are served on the network thread; everything else still goes to a
worker. Real broker, real LiteRT; which path served a request shows in the ``served_inline`` counter."""

from __future__ import annotations

import time

from agent.app import Agent
from tests.fixtures.agents import face_image_b64

TINY = {"model": "vibration-anomaly", "inputs": {"features": [[0.1, 0.2, 0.1, 0.0, 0.3, 0.2, 0.1, 0.0]]}}
# Which path serves a request is what these tests check, not how fast the model is (tests/test_heads.py checks
# the latency comparison): on a loaded machine the tiny model's runs averaged over the default 2 ms.
FAST_ENOUGH = {"inline_max_ms": 1000}


def _idle(agent: Agent) -> None:
    """Wait until no request is queued or served: a worker still counts as busy for a moment after its reply
    reached the client, and a request arriving then goes to a worker too."""
    assert agent.dispatcher is not None
    agent.dispatcher.drain(time.monotonic() + 10)
    assert agent.dispatcher.queue_depth() == 0


def test_a_measured_fast_model_is_served_inline_and_a_new_one_first_by_a_worker(start_agent, client_factory) -> None:
    agent = start_agent(limits=FAST_ENOUGH)
    client = client_factory("alice")
    first = client.call("infer", TINY)
    # Not loaded and never measured when it arrived: a worker loads and times it.
    assert agent.counters["served_inline"] == 0
    _idle(agent)
    replies = [client.call("infer", TINY) for _ in range(10)]
    assert agent.counters["served_inline"] == 10
    assert all(reply["result"]["outputs"] == first["result"]["outputs"] for reply in replies)
    assert client.call("ping")["result"] == {}
    assert agent.counters["served_inline"] == 11


def test_inline_and_worker_replies_carry_the_same_answer(start_agent, client_factory) -> None:
    inline_agent = start_agent(device_id="inline", limits=FAST_ENOUGH)
    worker_agent = start_agent(device_id="workers", limits={"inline_max_ms": 0})
    inline_client = client_factory("alice", device_id="inline")
    worker_client = client_factory("alice", device_id="workers")
    for _ in range(3):
        inline_reply = inline_client.call("infer", TINY)
        worker_reply = worker_client.call("infer", TINY)
        _idle(inline_agent)
    assert inline_agent.counters["served_inline"] == 2 and worker_agent.counters["served_inline"] == 0
    for key in ("outputs", "top", "model", "model_version", "served_by"):
        assert inline_reply["result"][key] == worker_reply["result"][key]


def test_large_payloads_slow_models_and_cloud_preference_go_to_a_worker(start_agent, client_factory) -> None:
    agent = start_agent(limits={"inline_max_ms": 1000})
    client = client_factory("alice")
    face = {"model": "face-detector", "inputs": {"image": face_image_b64(3)}}
    for _ in range(3):  # measured and loaded after the first; still far over the inline payload size
        assert "result" in client.call("infer", face, timeout=30)
    client.call("infer", TINY)
    assert client.call("infer", {**TINY, "prefer": "cloud"})["result"]["served_by"] == "local"  # no cloud here
    assert client.call("infer", {"task": "vibration-anomaly", "inputs": TINY["inputs"]})["result"]["model"] == TINY["model"]
    assert agent.counters["served_inline"] == 0


def test_concurrent_requests_are_all_answered_whichever_path_serves_each(start_agent, client_factory) -> None:
    # Both paths, whatever the machine's speed: with no read-ahead limit the burst's first request finds the
    # agent idle and is served inline; the face requests in it always go to a worker (far over the inline
    # payload size), and tiny ones arriving behind them wait in the intake for a worker too.
    agent = start_agent(limits={"inline_max_unread_bytes": 1 << 30, **FAST_ENOUGH})
    client = client_factory("alice")
    face = {"model": "face-detector", "inputs": {"image": face_image_b64(1)}}
    client.call("infer", TINY)
    _idle(agent)
    futures = [client.send("infer", face if index % 50 == 49 else TINY) for index in range(300)]
    replies = [future.result(60) for future in futures]
    assert all("result" in reply for reply in replies)
    assert len({reply["id"] for reply in replies}) == 300
    assert agent.counters["ok"] == 301
    assert 0 < agent.counters["served_inline"] <= 300 - 6


def _burst_while_not_reading(agent, client, count: int) -> list:  # type: ignore[no-untyped-def]
    """``count`` requests published while the agent's network thread is stopped, then read in one go."""
    network = agent.link.client
    network.loop_stop()
    futures = [client.send("infer", TINY) for _ in range(count)]
    deadline = time.monotonic() + 10
    while network.unread_bytes() < count * 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    network.loop_start()
    return [future.result(60) for future in futures]


def test_a_backlog_at_the_broker_is_read_ahead_into_the_intake_not_served_inline(start_agent, client_factory) -> None:
    # Requests left waiting at the broker are served there in arrival order, whoever sent them: while more
    # than inline_max_unread_bytes wait unread, the network thread reads them into the fair intake instead.
    agent = start_agent(limits={"inline_max_unread_bytes": 0, **FAST_ENOUGH})
    client = client_factory("alice")
    client.call("infer", TINY)
    _idle(agent)
    inline_before = agent.counters["served_inline"]
    replies = _burst_while_not_reading(agent, client, 200)
    assert all("result" in reply for reply in replies)
    assert agent.counters["ok"] == 201
    served_inline = agent.counters["served_inline"] - inline_before
    assert served_inline < 100, f"{served_inline} of 200 served inline despite the backlog"


def test_below_the_unread_limit_a_burst_is_still_served_inline(start_agent, client_factory) -> None:
    agent = start_agent(limits={"inline_max_unread_bytes": 1 << 30, **FAST_ENOUGH})
    client = client_factory("alice")
    client.call("infer", TINY)
    _idle(agent)
    inline_before = agent.counters["served_inline"]
    replies = _burst_while_not_reading(agent, client, 200)
    assert all("result" in reply for reply in replies)
    assert agent.counters["served_inline"] - inline_before == 200

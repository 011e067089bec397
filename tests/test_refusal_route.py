"""Refusals take the same validated route as every reply, and nothing a refused client sends can silence the
agent: a hostile client over its rate limit, on a real broker (found by testing from outside)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.app import Agent
from agent.mqtt.localbroker import MosquittoProcess
from agent.tools.client import DeviceClient
from tests.fixtures.agents import Listener

# Two admitted requests, then two answered refusals, then acknowledged unanswered (a flood's excess).
TIGHT = {"enabled": True, "requests_per_s": 0.01, "burst": 2, "global_requests_per_s": 1000}
TWO_REFUSALS = {"refusal_replies_per_s": 0.01, "refusal_replies_burst": 2}
NESTED = b"[" * 5000 + b"]" * 5000


def _with_response_topic(topic: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topic
    props.CorrelationData = b"c"
    return props


def _exhaust_admitted(agent: Agent, client: DeviceClient) -> None:
    for _ in range(TIGHT["burst"]):
        assert "result" in client.call("ping", timeout=10)
    assert agent.counters["rate_limited_client"] == 0


def _wait_counter(agent: Agent, name: str, value: int) -> None:
    deadline = time.monotonic() + 10
    while agent.counters[name] < value and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent.counters[name] >= value, dict(agent.counters)


def test_a_deeply_nested_refused_request_does_not_end_the_network_thread(
    start_agent: Callable[..., Agent], client_factory: Callable[..., DeviceClient]
) -> None:
    agent = start_agent(rate_limit=TIGHT, limits=TWO_REFUSALS)
    hostile = client_factory("hostile")
    _exhaust_admitted(agent, hostile)
    for _ in range(5):  # answered refusals first, then the unanswered path
        hostile.publish_raw(NESTED)
    _wait_counter(agent, "rate_limited_client", 5)
    assert client_factory("bob").call("ping", timeout=10)["result"] == {}
    assert agent.threads_alive()


def test_refusals_never_reach_another_clients_topic_the_status_topic_or_a_wildcard(
    start_agent: Callable[..., Agent], client_factory: Callable[..., DeviceClient], local_broker: MosquittoProcess
) -> None:
    agent = start_agent(rate_limit=TIGHT, limits=TWO_REFUSALS)
    listener = Listener(local_broker, "mcp/res/dev1/victim/#", "mcp/res/dev1/victim", "mcp/status/dev1", "mcp/res/dev1/hostile/#")
    try:
        hostile = client_factory("hostile")
        _exhaust_admitted(agent, hostile)
        own_default = len([m for m in listener.messages if m.topic == "mcp/res/dev1/hostile"])
        aimed = ["mcp/res/dev1/victim", "mcp/status/dev1", "mcp/res/dev1/hostile/#", "mcp/res/dev1/+"]
        for topic in aimed:
            hostile.publish_raw(b'{"jsonrpc":"2.0","id":"x","method":"ping"}', properties=_with_response_topic(topic))
        _wait_counter(agent, "rate_limited_client", len(aimed))
        assert client_factory("bob").call("ping", timeout=10)["result"] == {}
        assert agent.threads_alive()
        # The two answered refusals went to the hostile client's own default topic, without its correlation data.
        assert listener.wait_for(lambda ms: len([m for m in ms if m.topic == "mcp/res/dev1/hostile"]) >= own_default + 2)
        misdirected = [
            m for m in listener.messages
            if m.topic != "mcp/res/dev1/hostile" and "error" in json.loads(m.payload)
        ]  # fmt: skip
        assert misdirected == []
        assert agent.counters["response_topic_refused"] >= 2
    finally:
        listener.close()


def test_an_admitted_request_with_a_wildcard_response_topic_is_answered_on_the_default_topic(
    start_agent: Callable[..., Agent], client_factory: Callable[..., DeviceClient], local_broker: MosquittoProcess
) -> None:
    agent = start_agent()
    listener = Listener(local_broker, "mcp/res/dev1/#")
    try:
        client = client_factory("alice")
        client.publish_raw(b'{"jsonrpc":"2.0","id":"w","method":"ping"}', properties=_with_response_topic("mcp/res/dev1/alice/#"))
        assert listener.wait_for(lambda ms: any(m.topic == "mcp/res/dev1/alice" for m in ms))
        reply = json.loads(next(m for m in listener.messages if m.topic == "mcp/res/dev1/alice").payload)
        assert reply["error"]["data"]["reason"] == "response_topic_refused"
        assert client.call("ping", timeout=10)["result"] == {} and agent.threads_alive()
    finally:
        listener.close()

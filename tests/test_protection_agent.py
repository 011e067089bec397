"""Protection and observability of a running agent on a real broker: rate limits, replays, element counts,
health in the retained status, /metrics, and the audit trail stored in the outbox."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.app import Agent
from agent.mqtt import topics
from agent.mqtt.localbroker import MosquittoProcess
from agent.tools.client import DeviceClient
from agent.upstream.outbox import Outbox
from tests.fixtures.agents import Listener

PING = b'{"jsonrpc":"2.0","id":"p1","method":"ping"}'


def _request(request_id: object, method: str, params: dict | None = None) -> bytes:
    body: dict = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        body["params"] = params
    return json.dumps(body).encode()


def _scrape(agent: Agent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert agent.metrics_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _settles(future: Any, timeout: float = 0.5) -> bool:
    try:
        future.result(timeout)
    except FutureTimeout:
        return False
    return True


def test_a_flooder_is_refused_at_once_with_retry_after_and_others_are_served(
    start_agent: Callable[..., Agent],
    client_factory: Callable[..., DeviceClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = start_agent(
        rate_limit={"enabled": True, "requests_per_s": 0.5, "burst": 3, "global_requests_per_s": 1000},
        limits={"refusal_replies_per_s": 0.5, "refusal_replies_burst": 3},
    )
    flooder = client_factory("flooder")
    with caplog.at_level(logging.WARNING, logger="agent.observe.audit"):
        futures = [flooder.send("ping") for _ in range(30)]
        assert client_factory("bob").call("ping", timeout=10)["result"] == {}
        deadline = time.monotonic() + 10
        while agent.counters["rate_limited_client"] < 27 and time.monotonic() < deadline:
            time.sleep(0.02)
    replies = [future.result(10) for future in futures if future.done() or _settles(future)]
    refused = [reply for reply in replies if "error" in reply]
    # Refusals are answered within the client's refusal budget (a burst of 3 here); the rest are acknowledged
    # unanswered.
    assert len(refused) == 3 and sum("result" in reply for reply in replies) == 3
    assert agent.counters["refused_unanswered"] == 24
    for reply in refused:
        assert reply["error"]["code"] == -32003 and reply["id"] is not None
        assert reply["error"]["data"]["reason"] == "rate_limited" and reply["error"]["data"]["retry_after_ms"] > 0
    assert agent.counters["rate_limited_client"] == 27
    # The audit trail reports the flooder once, not 27 times.
    audited = [record for record in caplog.records if getattr(record, "audit", {}).get("kind") == "rate_limited"]
    assert len(audited) == 1 and audited[0].audit["client_id"] == "flooder"
    samples = _scrape(agent)
    assert samples[("edge_agent_requests_rejected_total", (("reason", "rate_limited_client"),))] == 27


def test_a_repeated_request_gets_the_same_signed_bytes_without_a_second_inference(
    start_agent: Callable[..., Agent],
    client_factory: Callable[..., DeviceClient],
    local_broker: MosquittoProcess,
    tmp_path: Path,
) -> None:
    agent = start_agent(signing={"backend": "software", "key_file": str(tmp_path / "key.pem")})
    client = client_factory("alice")
    replies = Listener(local_broker, "mcp/res/dev1/alice")
    inputs = {"features": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]}
    first_request = _request(5, "infer", {"model": "vibration-anomaly", "inputs": inputs})
    changed = _request(5, "infer", {"model": "vibration-anomaly", "inputs": {"features": [[0.0] * 8]}})
    try:
        for count, payload in enumerate((first_request, first_request, changed), start=1):
            client.publish_raw(payload)
            assert replies.wait_for(lambda msgs, count=count: len(msgs) >= count)
        first, repeated, other = (message.payload for message in replies.messages)
    finally:
        replies.close()
    assert repeated == first  # a fresh signature would differ: these are the cached bytes
    assert other != first
    assert (agent.counters["ok"], agent.counters["replayed"]) == (2, 1)
    samples = _scrape(agent)
    assert samples[("edge_agent_requests_total", (("method", "infer"), ("model", "vibration-anomaly"), ("outcome", "replayed")))] == 1
    assert samples[("edge_agent_request_duration_seconds_count", (("stage", "inference"),))] == 2


def test_too_many_json_values_are_refused_before_parsing(
    start_agent: Callable[..., Agent], client_factory: Callable[..., DeviceClient]
) -> None:
    start_agent(limits={"max_json_values": 100})
    client = client_factory("alice")
    client.publish_raw(_request(1, "infer", {"model": "vibration-anomaly", "inputs": {"features": [[0] * 200]}}))
    deadline = time.monotonic() + 10
    while not client.unmatched and time.monotonic() < deadline:
        time.sleep(0.02)
    (reply,) = client.unmatched  # refused before parsing: like a too-deep request, its id is not read
    assert reply["error"]["code"] == -32600 and "JSON values" in reply["error"]["message"]
    assert client.call("infer", {"model": "vibration-anomaly", "inputs": {"features": [[0] * 8]}})["result"]


def test_the_retained_status_carries_health_and_refreshes(
    start_agent: Callable[..., Agent], local_broker: MosquittoProcess
) -> None:
    agent = start_agent()
    status_topic = topics.status_topic("dev1")
    published = Listener(local_broker, status_topic)
    try:
        assert published.wait_for(lambda msgs: len(msgs) >= 1)
        first = json.loads(published.messages[0].payload)
        agent.refresh_status()
        assert published.wait_for(lambda msgs: len(msgs) >= 2)
        second = json.loads(published.messages[-1].payload)
    finally:
        published.close()
    assert first["status"] == "online"
    health = second["health"]
    assert health["uptime_s"] >= first["health"]["uptime_s"]
    assert health["memory"]["rss_bytes"] > 0 and len(health["load_average"]) == 3
    assert health["outbox"] is None and health["cloud"] is None  # no [cloud]: local-only


def test_refused_steering_and_rotations_are_audited_into_the_outbox(
    start_agent: Callable[..., Agent],
    client_factory: Callable[..., DeviceClient],
    cloud_broker: MosquittoProcess,
    tmp_path: Path,
) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    cloud = {"host": cloud_broker.host, "port": cloud_broker.port}
    signing = {"backend": "software", "key_file": str(tmp_path / "key.pem")}
    agent = start_agent(cloud=cloud, signing=signing)
    cloud_broker.stop()  # nothing drains: every audit record stays in the outbox to be read
    client = client_factory("mallory")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "mcp/res/dev1/alice"
    for n in range(5):
        client.publish_raw(_request(n, "ping"), properties=props)
    assert "result" in client.call("ping")
    agent.signer.rotate()  # type: ignore[union-attr]
    agent.stop()
    with Outbox(tmp_path / "data" / "outbox.db") as outbox:
        rows = [json.loads(record.body) for record in outbox.claim_batch(1000) if record.cls == "audit"]
    kinds = [(row["kind"], row.get("client_id")) for row in rows]
    assert kinds.count(("response_topic_refused", "mallory")) == 1
    assert ("signing_key_rotated", None) in kinds


def test_metrics_report_requests_by_method_and_outcome(
    start_agent: Callable[..., Agent], client_factory: Callable[..., DeviceClient]
) -> None:
    agent = start_agent()
    client = client_factory("alice")
    client.call("ping")
    client.call("no/such")
    deadline = time.monotonic() + 10
    while True:
        samples = _scrape(agent)
        key = ("edge_agent_requests_total", (("method", "other"), ("model", "none"), ("outcome", "method_not_found")))
        if key in samples or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert samples[key] == 1
    assert samples[("edge_agent_requests_total", (("method", "ping"), ("model", "none"), ("outcome", "ok")))] == 1
    assert samples[("edge_agent_intake_depth", ())] == 0
    assert samples[("edge_agent_signing_info", (("backend", "none"), ("mode", "none")))] == 1


def test_model_swaps_are_audited_and_health_goes_upstream_as_telemetry(
    start_agent: Callable[..., Agent],
    client_factory: Callable[..., DeviceClient],
    cloud_broker: MosquittoProcess,
    models_dir: Path,
    tmp_path: Path,
) -> None:
    agent = start_agent(cloud={"host": cloud_broker.host, "port": cloud_broker.port}, models_poll_s=0)
    cloud_broker.stop()  # nothing drains: the records stay in the outbox to be read
    client = client_factory("alice")
    assert "result" in client.call("infer", {"model": "vibration-anomaly", "inputs": {"features": [[0] * 8]}})
    manifest = json.loads((models_dir / "manifest.json").read_text())
    entry = next(model for model in manifest["models"] if model["id"] == "vibration-anomaly")
    entry["version"] = "1.0.1"
    (models_dir / "manifest.json").write_text(json.dumps(manifest))
    assert agent.models.reload()
    agent.refresh_status()
    samples = _scrape(agent)
    agent.stop()
    with Outbox(tmp_path / "data" / "outbox.db") as outbox:
        records = [(record.cls, json.loads(record.body)) for record in outbox.claim_batch(1000)]
    audits = [body for cls, body in records if cls == "audit"]
    swaps = [body for body in audits if body["kind"] == "model_swapped"]
    assert [swap["detail"] for swap in swaps] == [{"model": "vibration-anomaly", "old": "1.0.0", "new": "1.0.1"}]
    telemetry = [body for cls, body in records if cls == "telemetry"]
    assert telemetry and telemetry[0]["health"]["memory"]["rss_bytes"] > 0 and telemetry[0]["counters"]["ok"] == 1
    assert samples[("edge_agent_model_loads_total", (("model", "vibration-anomaly"),))] == 1

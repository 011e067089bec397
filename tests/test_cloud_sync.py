"""The outbox on the request path, against a real cloud broker that is down, restarted, or answering fallbacks."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import BUNDLED_MODELS_DIR
from agent.mqtt import topics
from agent.mqtt.localbroker import MosquittoProcess
from agent.mqtt.transport import new_client
from agent.signing import verify_message
from tests.fixtures.agents import AgentProcess, agent_overrides, write_config
from tests.fixtures.generated_models import add_model, sized_model

EXAMPLE = json.loads((BUNDLED_MODELS_DIR / "manifest.json").read_text())["models"][0]["examples"][0]["inputs"]


def _cloud(broker: MosquittoProcess, **extra: Any) -> dict[str, Any]:
    return {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, **extra}


def _process_config(tmp_path: Path, local: MosquittoProcess, cloud: MosquittoProcess, **extra: Any) -> Path:
    """A config file for an agent subprocess on the local broker, draining to ``cloud``."""
    values = agent_overrides(local, BUNDLED_MODELS_DIR, tmp_path / "data", cloud=_cloud(cloud), **extra)
    return write_config(tmp_path / "agent.toml", values)


def _responses(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["class"] == "res"]


def test_cloud_down_for_the_whole_run_then_everything_arrives_in_order(start_agent, client_factory, cloud_broker, cloud_side) -> None:
    cloud_broker.stop()
    # Single envelopes, whose msg-id user property is checked below; the other tests here run batched.
    agent = start_agent(cloud=_cloud(cloud_broker, batch=False), signing={"backend": "software", "key_file": None})
    client = client_factory("alice")
    answered = [client.call("infer", {"model": "vibration-anomaly", "inputs": EXAMPLE}) for _ in range(30)]
    answered.append(client.call("infer", {"model": "no-such-model", "inputs": {}}))
    assert agent.upstream is not None and agent.upstream.outbox.stats().messages == 31
    cloud_broker.start()
    assert cloud_side.wait_for(lambda records: len(_responses(records)) >= 31)
    delivered = _responses(cloud_side.records)
    bodies = [json.loads(json.dumps(record["body"])) if isinstance(record["body"], dict) else json.loads(record["body"]) for record in delivered]
    assert [body["reply"]["id"] for body in bodies] == [reply["id"] for reply in answered]
    assert all(body["client_id"] == "alice" and body["method"] == "infer" for body in bodies)
    assert len({record["msg_id"] for record in delivered}) == len(delivered)
    assert [record["seq"] for record in delivered] == sorted(record["seq"] for record in delivered)
    assert cloud_side.user_msg_ids[: len(delivered)] == [record["msg_id"] for record in delivered]
    public_key = agent.signer.public_key
    for body in bodies:
        verify_message(body["reply"], public_key)  # the copy is exactly the signed reply the client got
    assert bodies[-1]["reply"]["error"]["code"] == -32602


def test_cloud_restart_mid_drain_loses_nothing(start_agent, client_factory, cloud_broker, cloud_side) -> None:
    start_agent(cloud=_cloud(cloud_broker), signing={"backend": "none"}, limits={"intake_queue": 1000})
    client = client_factory("alice")
    futures = [client.send("infer", {"model": "vibration-anomaly", "inputs": EXAMPLE}) for _ in range(300)]
    cloud_broker.restart()
    replies = [future.result(30) for future in futures]
    assert all("result" in reply for reply in replies)
    assert cloud_side.wait_for(lambda records: {r["body"]["reply"]["id"] for r in _responses(records)} >= {reply["id"] for reply in replies})
    per_msg = {}
    for record in _responses(cloud_side.records):
        per_msg.setdefault(record["msg_id"], record["body"]["reply"]["id"])
    assert sorted(per_msg.values()) == sorted(reply["id"] for reply in replies)


def test_a_full_outbox_disk_does_not_stop_local_answers(start_agent, client_factory, cloud_broker) -> None:
    cloud_broker.stop()
    agent = start_agent(cloud=_cloud(cloud_broker), outbox={"max_file_bytes": 65536}, signing={"backend": "none"})
    client = client_factory("alice")
    image_like = [[0.2, 0.62, 3.1, 3.0, 0.5, 0.35, 0.15, 41.0]]
    replies = [client.call("infer", {"model": "vibration-anomaly", "inputs": {"features": image_like}}) for _ in range(200)]
    assert all("result" in reply for reply in replies)
    assert agent.counters["outbox_write_failed_res"] > 0
    stored = agent.upstream.outbox.stats().messages
    assert 0 < stored < 200


class CloudService:
    """A stand-in for the cloud's inference service: answers fallback requests on the cloud broker."""

    def __init__(
        self, broker: MosquittoProcess, device_id: str = "dev1", *, answer: bool = True, delay_s: float = 0.0
    ) -> None:
        self.requests: list[dict[str, Any]] = []
        self._answer = answer
        self._delay_s = delay_s
        self._client = new_client("cloud-service")
        self._client.on_connect = lambda c, u, f, r, p: c.subscribe(topics.cloud_request_topic(device_id), qos=1)
        self._client.on_message = self._on_message
        self._ready = threading.Event()
        self._client.on_subscribe = lambda *args: self._ready.set()
        self._device_id = device_id
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        assert self._ready.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        envelope = json.loads(message.payload)
        self.requests.append(envelope)
        if not self._answer:
            return
        request = envelope["body"]["request"]
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("msg-id", envelope["msg_id"])]
        result = {"model": request["params"]["model"], "model_version": "cloud-7", "outputs": {"score": [[0.5]]}}
        reply = {"jsonrpc": "2.0", "id": request["id"], "result": result}
        time.sleep(self._delay_s)  # on paho's thread: a slow cloud, answering in order
        client.publish(topics.cloud_reply_topic(self._device_id), json.dumps(reply), qos=1, properties=props)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def test_fallback_to_the_cloud_answers_timeouts_and_limits(start_agent, client_factory, cloud_broker) -> None:
    agent = start_agent(
        cloud=_cloud(cloud_broker, fallback_models=["big-vision-model", "vibration-anomaly"]), signing={"backend": "none"}
    )
    client = client_factory("alice")
    service = CloudService(cloud_broker)
    try:
        reply = client.call("infer", {"model": "big-vision-model", "inputs": {"image": [[1]]}})
        assert reply["result"]["served_by"] == "cloud" and reply["result"]["model_version"] == "cloud-7"
        assert service.requests[0]["body"]["client_id"] == "alice"
        preferred = client.call("infer", {"model": "vibration-anomaly", "inputs": EXAMPLE, "prefer": "cloud"})
        assert preferred["result"]["served_by"] == "cloud"
        local = client.call("infer", {"model": "vibration-anomaly", "inputs": EXAMPLE})
        assert local["result"]["served_by"] == "local"
        unlisted = client.call("infer", {"model": "not-in-the-catalogue", "inputs": {}})
        assert unlisted["error"]["code"] == -32602
        limited = [client.call("infer", {"model": "big-vision-model", "inputs": {"image": [[1]]}}) for _ in range(8)]
        assert any(r.get("error", {}).get("code") == -32003 and r["error"]["data"]["retry_after_ms"] > 0 for r in limited)
    finally:
        service.close()
    silent = CloudService(cloud_broker, answer=False)
    try:
        fresh = client_factory("bob")  # alice spent her fallback budget above; bob's is full
        timed_out = fresh.call("infer", {"model": "big-vision-model", "inputs": {"image": [[1]]}, "timeout_ms": 500})
        assert timed_out["error"]["code"] == -32007
        assert agent.counters["fallback_timed_out"] == 1
    finally:
        silent.close()


def test_agent_killed_at_random_moments_still_delivers_every_answered_response(
    tmp_path: Path, local_broker, cloud_broker, cloud_side, client_factory
) -> None:
    cloud_broker.stop()
    config = _process_config(tmp_path, local_broker, cloud_broker, limits={"intake_queue": 1000})
    client = client_factory("alice", session_expiry=600)
    answered: set[str] = set()
    rng = random.Random(7)
    for _ in range(6):
        agent = AgentProcess(config, local_broker).start()
        futures = [client.send("infer", {"model": "vibration-anomaly", "inputs": EXAMPLE}) for _ in range(60)]
        time.sleep(rng.uniform(0.0, 0.3))
        agent.signal(signal.SIGKILL)
        agent.wait(10)
        replies = [future.result() for future in futures if future.done()]
        assert all("result" in reply for reply in replies)
        answered |= {reply["id"] for reply in replies}
    agent = AgentProcess(config, local_broker).start()
    try:
        cloud_broker.start()
        delivered = lambda records: {r["body"]["reply"]["id"] for r in _responses(records)}  # noqa: E731
        assert cloud_side.wait_for(lambda records: delivered(records) >= answered, timeout=60)
    finally:
        agent.stop()
    assert answered


def test_outbox_cli_status_and_peek_while_the_agent_runs(tmp_path: Path, local_broker, cloud_broker, client_factory) -> None:
    import subprocess
    import sys

    cloud_broker.stop()
    config = _process_config(tmp_path, local_broker, cloud_broker)
    agent = AgentProcess(config, local_broker).start()
    try:
        client = client_factory("alice")
        for _ in range(5):
            assert "result" in client.call("infer", {"model": "vibration-anomaly", "inputs": EXAMPLE})
        run = lambda *args: subprocess.run(  # noqa: E731
            [sys.executable, "-m", "agent", "outbox", *args, "--config", str(config)],
            capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1],
        )
        status = run("status")
        assert status.returncode == 0, status.stderr
        stats = json.loads(status.stdout)
        assert stats["messages"] == 5 and stats["classes"]["res"]["queued"] == 5
        peek = run("peek", "--limit", "2")
        rows = [json.loads(line) for line in peek.stdout.splitlines()]
        assert peek.returncode == 0 and len(rows) == 2 and rows[0]["cls"] == "res"
    finally:
        agent.stop()


def test_a_late_cloud_answer_is_dropped_and_a_model_too_large_here_is_forwarded(
    start_agent, client_factory, cloud_broker, models_dir
) -> None:
    add_model(models_dir, "too-big-here", sized_model(4.0), labels=[])
    agent = start_agent(
        cloud=_cloud(cloud_broker, fallback_models=["too-big-here", "big-vision-model"]),
        signing={"backend": "none"},
        limits={"model_memory_mb": 2, "process_soft_limit_mb": 4000},
    )
    client = client_factory("alice")
    service = CloudService(cloud_broker, delay_s=1.0)
    try:
        forwarded = client.call("infer", {"model": "too-big-here", "inputs": {"x": [[0.0] * 256]}})
        assert forwarded["result"]["served_by"] == "cloud"
        late = client.call("infer", {"model": "big-vision-model", "inputs": {"image": [[1]]}, "timeout_ms": 300})
        assert late["error"]["code"] == -32007
        deadline = time.monotonic() + 10
        while agent.counters["fallback_late_or_unknown"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.counters["fallback_late_or_unknown"] == 1
        assert not [reply for reply in client.unmatched if reply.get("id") == late["id"]]
    finally:
        service.close()

"""Issue #12, the findings of a hostile client, a hostile cloud service and a hostile models folder, each against
the real agent as a subprocess on a real mosquitto: the hostile input, then ``ping`` and a correct ``infer``,
memory within bounds, and SIGTERM exiting 0 (``_still_serving``).

The in-process tests of the same paths (tests/test_refusal_route.py, tests/test_fallback.py,
tests/test_model_files.py) look at counters; these look at what a user of the device would see.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.models.devmodels import copy_bundled_models
from agent.mqtt import topics
from agent.mqtt.localbroker import MosquittoProcess
from agent.mqtt.transport import new_client
from agent.tools.client import DeviceClient
from tests.fixtures.agents import AgentProcess, Listener, agent_overrides, write_config
from tests.fixtures.generated_models import add_model, add_unsafe_file_entries, sized_model
from tests.test_hostile_peers import PROCESS_MEMORY_MB, _config, _still_serving

# Every client may send two requests, then it is refused; every refusal below is answered (not acknowledged
# unanswered), so each hostile message goes down the path that used to read its id and publish its reply unchecked.
TIGHT = {"enabled": True, "requests_per_s": 0.01, "burst": 2, "global_requests_per_s": 1000}
ANSWERED_REFUSALS = {"refusal_replies_per_s": 0.01, "refusal_replies_burst": 100}
NESTED = b"[" * 5000 + b"]" * 5000  # ten thousand bytes: RecursionError in json.loads
PING = b'{"jsonrpc":"2.0","id":"x","method":"ping"}'
# Response Topics a refused client named: another client's, the device's status topic, wildcards, empty.
AIMED = [
    "mcp/res/dev1/victim", "mcp/res/dev1/victim/x", "mcp/status/dev1", "mcp/res/dev1/hostile/#", "mcp/res/dev1/+", "",
]  # fmt: skip
DISCONNECTED = "disconnected from local broker"


def _response_topic(topic: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topic
    props.CorrelationData = b"c"
    return props


def test_a_rate_limited_client_can_neither_silence_the_agent_nor_aim_its_refusals(
    tmp_path: Path, local_broker: MosquittoProcess, client_factory: Callable[..., DeviceClient]
) -> None:
    config = _config(tmp_path, local_broker, ANSWERED_REFUSALS, rate_limit=TIGHT)
    agent = AgentProcess(config, local_broker).start()
    watched = ("mcp/res/dev1/victim", "mcp/res/dev1/victim/#", "mcp/status/dev1", "mcp/res/dev1/hostile/#")
    listener = Listener(local_broker, *watched)
    try:
        hostile = client_factory("hostile")
        for _ in range(TIGHT["burst"]):
            assert "result" in hostile.call("ping", timeout=10)
        for _ in range(3):
            hostile.publish_raw(NESTED)
            for topic in AIMED:
                hostile.publish_raw(PING, properties=_response_topic(topic))
                hostile.publish_raw(NESTED, properties=_response_topic(topic))
        # The refusals of one client are handled in order: this one's answer comes after all of the above.
        refused = hostile.call("ping", timeout=30)
        assert refused["error"]["code"] == -32003, refused
        time.sleep(1)  # what an empty Response Topic used to set off: the broker cutting the agent, again and again
        misdirected = [
            m.topic for m in listener.messages if m.topic != "mcp/res/dev1/hostile" and "error" in json.loads(m.payload)
        ]  # fmt: skip
        assert misdirected == [], misdirected
        assert DISCONNECTED not in agent.log_path.read_text()
        _still_serving(agent, client_factory("alice"))
    finally:
        listener.close()
        agent.stop()
    assert DISCONNECTED not in agent.log_path.read_text()


# Cloud answers the agent used to consume without relaying anything: the client got neither them nor -32007.
UNUSABLE_ANSWERS = [
    b"[1, 2, 3]",
    json.dumps({"jsonrpc": "2.0", "result": {"_meta": [1]}}).encode(),
    json.dumps({"jsonrpc": "2.0", "error": {"code": 1, "message": "m", "data": "not an object"}}).encode(),
    b'{"jsonrpc": "2.0", "result": {"x": ' + b"[" * 600 + b"]" * 600 + b"}}",
]


class UnusableCloudService:
    """The cloud's inference service gone wrong: answers the n-th fallback request with the n-th unusable answer."""

    def __init__(self, broker: MosquittoProcess) -> None:
        self.answered = 0
        self._client = new_client("hostile-cloud-service")
        self._client.on_connect = lambda c, u, f, r, p: c.subscribe(topics.cloud_request_topic("dev1"), qos=1)
        self._client.on_message = self._on_message
        self._ready = threading.Event()
        self._client.on_subscribe = lambda *args: self._ready.set()
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        assert self._ready.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        envelope = json.loads(message.payload)
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("msg-id", envelope["msg_id"])]
        answer = UNUSABLE_ANSWERS[self.answered % len(UNUSABLE_ANSWERS)]
        self.answered += 1
        client.publish(topics.cloud_reply_topic("dev1"), answer, qos=1, properties=props)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def test_cloud_answers_that_cannot_be_relayed_leave_each_client_its_timeout(
    tmp_path: Path, local_broker: MosquittoProcess, cloud_broker: MosquittoProcess,
    client_factory: Callable[..., DeviceClient],
) -> None:  # fmt: skip
    cloud = {
        "host": cloud_broker.host, "port": cloud_broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5,
        "fallback_models": ["big-vision-model"], "batch": False,
    }  # fmt: skip
    service = UnusableCloudService(cloud_broker)
    agent = AgentProcess(_config(tmp_path, local_broker, cloud=cloud), local_broker).start()
    try:
        clients = [client_factory(f"client-{n}") for n in range(len(UNUSABLE_ANSWERS))]
        request = {"model": "big-vision-model", "inputs": {"image": "x"}, "timeout_ms": 3000}
        futures = []
        for client in clients:  # one at a time: the n-th request forwarded gets the n-th answer
            futures.append(client.send("infer", request))
            deadline = time.monotonic() + 30
            while service.answered < len(futures) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert service.answered == len(UNUSABLE_ANSWERS)
        replies = [future.result(30) for future in futures]
        assert [reply["error"]["code"] for reply in replies] == [-32007] * len(UNUSABLE_ANSWERS), replies
        _still_serving(agent, clients[0])
    finally:
        agent.stop()
        service.close()


def _hostile_models(tmp_path: Path) -> Path:
    """The bundled models plus entries whose files are a FIFO, a symlink to /dev/zero, ``../`` and absolute paths."""
    models = copy_bundled_models(tmp_path / "models")
    add_unsafe_file_entries(models, sized_model(0.1))
    return models


def _model_ids(client: DeviceClient) -> set[str]:
    return {model["id"] for model in client.call("models/list")["result"]["models"]}


def test_a_models_folder_naming_a_fifo_a_device_or_files_outside_it_is_served_and_still_watched(
    tmp_path: Path, local_broker: MosquittoProcess, client_factory: Callable[..., DeviceClient]
) -> None:
    models = _hostile_models(tmp_path)
    values = agent_overrides(
        local_broker, models, tmp_path / "data", models_poll_s=0.2, limits={"process_memory_mb": PROCESS_MEMORY_MB}
    )
    # A FIFO used to block the start for good; a restart comes online just the same.
    agent = AgentProcess(write_config(tmp_path / "agent.toml", values), local_broker).start()
    try:
        client = client_factory("alice")
        for refused in ("fifo", "zero", "outside", "absolute"):
            reply = client.call("infer", {"model": refused, "inputs": {"x": [[0.0] * 256]}})
            assert reply["error"]["code"] == -32002, reply
        # The watcher was not left blocked on the FIFO or spinning on /dev/zero: a later update is seen.
        add_model(models, "late", sized_model(0.1), task="sized")
        deadline = time.monotonic() + 30
        while "late" not in _model_ids(client) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "late" in _model_ids(client)
        _still_serving(agent, client)
    finally:
        agent.stop()

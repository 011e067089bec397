"""Admission from outside, as users would meet it: a real agent, a real mosquitto started with the queue
settings the device broker ships with (systemd/mosquitto-edge-agent.conf), bursts, paced clients,
floods, deadlines and a kill -9 with requests waiting."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.app import Agent
from agent.config import LocalBroker
from agent.models.devmodels import copy_bundled_models
from agent.mqtt import topics
from agent.mqtt.localbroker import MosquittoProcess
from agent.mqtt.transport import new_client
from agent.tools.client import DeviceClient
from tests.fixtures.agents import REPO_ROOT, AgentProcess, started_agents, write_config
from tests.fixtures.generated_models import add_model, slow_model

SHIPPED_BROKER_CONF = REPO_ROOT / "systemd" / "mosquitto-edge-agent.conf"
VIBRATION = {"model": "vibration-anomaly", "inputs": {"features": [[0.2, 0.62, 3.1, 3.0, 0.5, 0.35, 0.15, 41.0]]}}
SLOW_LAYERS = 20  # about 5-8 ms per inference here: a Python flooder can offer many times that


def shipped_queue_config() -> str:
    """The queue and in-flight bounds of the shipped device broker config, for a test broker."""
    keys = ("max_queued_messages", "max_queued_bytes", "max_inflight_messages", "max_inflight_bytes")
    lines = [line for line in SHIPPED_BROKER_CONF.read_text().splitlines() if line.split(" ")[0] in keys]
    assert any(line.startswith("max_queued_messages") for line in lines), "the shipped broker config sets no queue bound"
    return "\n".join(lines)


@pytest.fixture
def shipped_broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    broker = MosquittoProcess(tmp_path / "shipped-broker", queue_config=shipped_queue_config()).start()
    yield broker
    broker.close()


@pytest.fixture
def clients(shipped_broker: MosquittoProcess) -> Iterator[Callable[[str], DeviceClient]]:
    made: list[DeviceClient] = []

    def make(client_id: str) -> DeviceClient:
        client = DeviceClient(LocalBroker(host=shipped_broker.host, port=shipped_broker.port), "dev1", client_id)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def _process_config(tmp_path: Path, broker: MosquittoProcess, **extra: Any) -> Path:
    """A config with nothing but where things are: every admission setting is the built-in default."""
    values: dict[str, Any] = {
        "device_id": "dev1",
        "models_dir": str(copy_bundled_models(tmp_path / "models")),
        "data_dir": str(tmp_path / "data"),
        "local": {"host": broker.host, "port": broker.port},
        "signing": {"backend": "none"},
        "metrics": {"port": 0},
        **extra,
    }
    return write_config(tmp_path / "agent.toml", values)


def _errors(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [reply["error"] for reply in replies if "error" in reply]


def test_shipped_defaults_answer_every_request_of_a_burst_from_one_client(
    tmp_path: Path, shipped_broker: MosquittoProcess, clients: Callable[[str], DeviceClient]
) -> None:
    agent = AgentProcess(_process_config(tmp_path, shipped_broker), shipped_broker).start()
    try:
        camera = clients("camera")
        for burst in (256, 2000):
            futures = [camera.send("infer", VIBRATION) for _ in range(burst)]
            replies = [future.result(120) for future in futures]
            assert _errors(replies) == [] and len(replies) == burst
    finally:
        agent.stop()


@pytest.mark.parametrize("profile,rate", [("default", 30.0), ("rpi4-1gb", 10.0)])
def test_a_lone_paced_client_is_never_refused(
    tmp_path: Path, shipped_broker: MosquittoProcess, clients: Callable[[str], DeviceClient], profile: str, rate: float
) -> None:
    agent = AgentProcess(_process_config(tmp_path, shipped_broker, profile=profile), shipped_broker).start()
    try:
        camera = clients("camera")
        futures = []
        start = time.monotonic()
        for n in range(int(rate * 4)):
            time.sleep(max(0.0, start + n / rate - time.monotonic()))
            futures.append(camera.send("infer", VIBRATION))
        replies = [future.result(60) for future in futures]
        assert _errors(replies) == []
    finally:
        agent.stop()


def test_requests_waiting_in_the_session_through_a_kill_9_are_all_answered(
    tmp_path: Path, shipped_broker: MosquittoProcess, clients: Callable[[str], DeviceClient]
) -> None:
    config = _process_config(tmp_path, shipped_broker)
    agent = AgentProcess(config, shipped_broker).start()
    camera = clients("camera")
    assert "result" in camera.call("infer", VIBRATION, timeout=30)
    assert agent.proc is not None
    agent.proc.kill()
    agent.proc.wait(10)
    futures = [camera.send("infer", VIBRATION) for _ in range(200)]
    restarted = AgentProcess(config, shipped_broker).start()
    try:
        replies = [future.result(120) for future in futures]
        assert _errors(replies) == [] and len(replies) == 200
    finally:
        restarted.stop()


def _slow_agent(start: Callable[..., Agent], models_dir: Path, **limits: Any) -> Agent:
    add_model(models_dir, "slow", slow_model(SLOW_LAYERS), task="slow")
    return start(limits={"workers": 1, "inline_max_ms": 0, **limits})


def _slow_request(request_id: str, **params: Any) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "method": "infer",
         "params": {"model": "slow", "inputs": {"x": [[0.5] * 1024]}, **params}}
    ).encode()  # fmt: skip


def _expiring(seconds: int) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = seconds
    return props


@pytest.fixture
def start_on_shipped(shipped_broker: MosquittoProcess, models_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """In-process agents on the broker with the shipped queue settings."""
    with started_agents(shipped_broker, models_dir, tmp_path / "data") as start:
        yield start


def test_a_deadline_earlier_than_the_wait_ahead_is_refused_at_once_and_one_that_fits_is_served(
    start_on_shipped: Callable[..., Agent], models_dir: Path, clients: Callable[[str], DeviceClient]
) -> None:
    agent = _slow_agent(start_on_shipped, models_dir)
    alice, bob = clients("alice"), clients("bob")
    for _ in range(5):  # the agent measures what a run of this model costs
        assert "result" in alice.call("infer", {"model": "slow", "inputs": {"x": [[0.5] * 1024]}}, timeout=30)
    # The backlog's own deadline is far off: on a loaded machine 500 runs can outlast the default timeout, and
    # refusing them would spend alice's refusal budget before the refusal this test is about.
    backlog = [
        alice.send("infer", {"model": "slow", "inputs": {"x": [[0.5] * 1024]}, "timeout_ms": 600_000}) for _ in range(500)
    ]
    deadline_wait = time.monotonic() + 30
    while agent.dispatcher is not None and agent.dispatcher.queue_depth() < 300 and time.monotonic() < deadline_wait:
        time.sleep(0.01)
    # Behind alice's own backlog (seconds of work) a 1 s expiry or a 200 ms timeout cannot be met: refused at once.
    alice.publish_raw(_slow_request("alice-expiring"), properties=_expiring(1))
    refused = alice.send("infer", {"model": "slow", "inputs": {"x": [[0.5] * 1024]}, "timeout_ms": 200})
    # Bob has nothing queued: round robin serves him next, well within the same deadlines.
    served = bob.send("infer", {"model": "slow", "inputs": {"x": [[0.5] * 1024]}, "timeout_ms": 1000})
    assert "result" in served.result(10)
    error = refused.result(10)["error"]
    assert (error["code"], error["data"]["reason"]) == (-32008, "deadline_unmeetable")
    assert error["data"]["expected_wait_ms"] > error["data"]["deadline_ms"]
    waited = time.monotonic() + 10
    while not any(reply.get("id") == "alice-expiring" for reply in alice.unmatched) and time.monotonic() < waited:
        time.sleep(0.01)
    expiring = next(reply for reply in alice.unmatched if reply.get("id") == "alice-expiring")
    assert expiring["error"]["code"] == -32008
    for future in backlog:
        assert "result" in future.result(120)


class Flooder:
    """An open-loop publisher at a fixed rate (it never waits for answers), with a new id per request."""

    def __init__(self, broker: MosquittoProcess, client_id: str, qos: int) -> None:
        self.sent = 0
        self._client = new_client(f"flooder-{client_id}-{qos}")
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        self._topic = topics.request_topic("dev1", client_id)
        self._qos = qos
        self._thread: threading.Thread | None = None

    def run_for(self, seconds: float, rate_per_s: float) -> None:
        def flood() -> None:
            start = time.monotonic()
            while (now := time.monotonic()) < start + seconds:
                due = int((now - start) * rate_per_s)
                while self.sent < due:
                    self._client.publish(self._topic, _slow_request(f"flood-{self.sent}"), qos=self._qos)
                    self.sent += 1
                time.sleep(0.002)

        self._thread = threading.Thread(target=flood, name="test-flooder", daemon=True)
        self._thread.start()

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join()
        self._client.disconnect()
        self._client.loop_stop()


@pytest.mark.parametrize("qos", [1, 0])
def test_a_paced_client_beside_a_flood_of_five_times_capacity_gets_every_request_answered(
    start_on_shipped: Callable[..., Agent], models_dir: Path, clients: Callable[[str], DeviceClient],
    shipped_broker: MosquittoProcess, qos: int,
) -> None:  # fmt: skip
    # The flood leaves hundreds of slow requests queued; the stop at teardown need not serve them (10 s).
    agent = _slow_agent(start_on_shipped, models_dir, intake_queue=512, drain_timeout_s=0.5)
    paced = clients("paced")
    assert "result" in paced.call("infer", {"model": "slow", "inputs": {"x": [[0.5] * 1024]}}, timeout=30)  # loaded
    warm = [paced.send("infer", {"model": "slow", "inputs": {"x": [[0.5] * 1024]}}) for _ in range(20)]
    timed = time.monotonic()
    assert all("result" in future.result(30) for future in warm)
    capacity_estimate = 20 / (time.monotonic() - timed)
    served_before = agent.counters["ok"]
    flooder = Flooder(shipped_broker, "flooder", qos)
    seconds = 4.0
    started = time.monotonic()
    flooder.run_for(seconds, rate_per_s=max(10 * capacity_estimate, 500.0))
    futures: list[Future[dict[str, Any]]] = []
    for n in range(int(seconds * 5)):  # 5 requests/s
        time.sleep(max(0.0, started + 0.2 + n / 5 - time.monotonic()))
        futures.append(paced.send("infer", {"model": "slow", "inputs": {"x": [[0.5] * 1024]}}))
    flooder.join()
    elapsed = time.monotonic() - started
    replies = [future.result(30) for future in futures]
    capacity_per_s = (agent.counters["ok"] - served_before) / elapsed
    assert flooder.sent / elapsed >= 5 * capacity_per_s, (flooder.sent, elapsed, capacity_per_s)
    assert _errors(replies) == []
    assert agent.threads_alive()

"""The agent as a real process: status and will, SIGTERM with requests in flight, requests across restarts."""

from __future__ import annotations

import base64
import json
import signal
import socket
import time

import numpy as np

from agent.config import BUNDLED_MODELS_DIR
from agent.mqtt import topics
from tests.fixtures.agents import AgentProcess, Listener, agent_overrides, write_config

VIBRATION = json.loads((BUNDLED_MODELS_DIR / "manifest.json").read_text())["models"][0]["examples"][0]["inputs"]


def _config(tmp_path, broker, models_dir, **limits):
    values = agent_overrides(broker, models_dir, tmp_path / "data", limits={"workers": 1, "intake_queue": 256, **limits})
    return write_config(tmp_path / "agent.toml", values)


def _statuses(listener: Listener) -> list[dict]:
    return [json.loads(m.payload) for m in listener.messages]


def test_sigterm_finishes_requests_in_flight_and_publishes_offline(tmp_path, local_broker, models_dir, client_factory) -> None:
    agent = AgentProcess(_config(tmp_path, local_broker, models_dir), local_broker).start()
    status = Listener(local_broker, topics.status_topic("dev1"))
    try:
        assert status.wait_for(lambda msgs: bool(msgs))
        online = _statuses(status)[-1]
        assert online["status"] == "online" and set(online["models"]) >= {"vibration-anomaly", "sensor-state"}
        client = client_factory("alice")
        image = np.zeros((1, 128, 128, 3), "<f4")
        b64 = {"b64": base64.b64encode(image.tobytes()).decode(), "dtype": "float32", "shape": [1, 128, 128, 3]}
        futures = [client.send("infer", {"model": "face-detector", "inputs": {"image": b64}}) for _ in range(40)]
        time.sleep(0.05)
        agent.signal(signal.SIGTERM)
        assert agent.wait(30) == 0
        replies = [future.result(10) for future in futures if future.done()]
        answered = {reply["id"] for reply in replies if "result" in reply}
        assert len(answered) >= 1
        assert status.wait_for(lambda msgs: _statuses(status)[-1]["status"] == "offline")
    finally:
        status.close()
        agent.stop()
    # Whatever was not answered before the stop stays in the agent's session and is answered after a restart.
    unanswered = [future for future in futures if not future.done()]
    restarted = AgentProcess(agent.config_path, local_broker).start()
    try:
        for future in unanswered:
            assert "result" in future.result(60)
    finally:
        restarted.stop()


def test_requests_sent_while_the_agent_is_down_are_served_after_restart(tmp_path, local_broker, models_dir, client_factory) -> None:
    config = _config(tmp_path, local_broker, models_dir)
    AgentProcess(config, local_broker).start().stop()
    client = client_factory("alice", session_expiry=600)
    futures = [client.send("infer", {"model": "vibration-anomaly", "inputs": VIBRATION}) for _ in range(20)]
    time.sleep(0.3)
    assert not any(future.done() for future in futures)
    agent = AgentProcess(config, local_broker).start()
    try:
        assert all(future.result(30)["result"]["top"][0]["label"] == "normal" for future in futures)
    finally:
        agent.stop()


def test_last_will_marks_a_killed_agent_offline(tmp_path, local_broker, models_dir) -> None:
    agent = AgentProcess(_config(tmp_path, local_broker, models_dir), local_broker).start()
    status = Listener(local_broker, topics.status_topic("dev1"))
    try:
        assert status.wait_for(lambda msgs: bool(msgs) and _statuses(status)[-1]["status"] == "online")
        agent.signal(signal.SIGKILL)
        agent.wait(10)
        assert status.wait_for(lambda msgs: _statuses(status)[-1]["status"] == "offline", timeout=20)
    finally:
        status.close()
        agent.stop()


def test_systemd_notify_ready_and_watchdog(tmp_path, local_broker, models_dir, monkeypatch) -> None:
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    agent = AgentProcess(_config(tmp_path, local_broker, models_dir), local_broker).start()
    try:
        received: list[str] = []
        while not any("WATCHDOG=1" in message for message in received):
            received.append(sock.recv(4096).decode())
        assert received[0].startswith("READY=1")
        agent.signal(signal.SIGTERM)
        assert agent.wait(30) == 0
        assert "STOPPING=1" in sock.recv(4096).decode()
    finally:
        sock.close()
        agent.stop()

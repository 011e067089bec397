"""Issue #12: nothing a client, the cloud or a scraper sends can silence the agent.

Each test runs the real agent as a subprocess on a real mosquitto, sends the hostile input, then checks that
the agent still answers ``ping`` and an ``infer`` correctly, that its memory stayed within bounds, and that
SIGTERM still ends it with exit status 0.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.config import BUNDLED_MODELS_DIR
from agent.mqtt import topics
from agent.mqtt.localbroker import MosquittoProcess, free_port
from agent.tools.client import DeviceClient
from tests.fixtures.agents import AgentProcess, agent_overrides, write_config
from tests.fixtures.hostile_broker import Behaviour, Connection, HostileBroker, publish_packet, remaining_length

EXAMPLE = json.loads((BUNDLED_MODELS_DIR / "manifest.json").read_text())["models"][0]["examples"][0]["inputs"]
# The agent's whole-process ceiling in these tests; it serves the bundled models well below it.
PROCESS_MEMORY_MB = 512
# What the agent may hold while a hostile cloud broker floods it: the bounds it announced, not the flood's size.
HOSTILE_CLOUD_RSS_MB = 200


def _config(tmp_path: Path, local: MosquittoProcess, limits: dict[str, Any] | None = None, **extra: Any) -> Path:
    limits = {"process_memory_mb": PROCESS_MEMORY_MB, **(limits or {})}
    values = agent_overrides(local, BUNDLED_MODELS_DIR, tmp_path / "data", limits=limits, **extra)
    return write_config(tmp_path / "agent.toml", values)


def _rss_mb(agent: AgentProcess) -> float:
    assert agent.proc is not None
    for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _still_serving(agent: AgentProcess, client: DeviceClient) -> None:
    """ping and a correct infer answer, memory under the ceiling, then SIGTERM exits 0."""
    assert client.call("ping")["result"] is not None
    answer = client.call("infer", {"model": "vibration-anomaly", "inputs": EXAMPLE})
    assert answer["result"]["top"][0]["label"] == "normal", answer
    assert _rss_mb(agent) < PROCESS_MEMORY_MB
    agent.signal(signal.SIGTERM)
    assert agent.wait(30) == 0, agent.log_path.read_text()


def test_idle_metrics_connections_cannot_take_the_descriptors_the_broker_link_needs(
    tmp_path: Path, local_broker: MosquittoProcess, client_factory: Callable[..., DeviceClient]
) -> None:
    port = free_port()
    config = _config(tmp_path, local_broker, metrics={"port": port, "max_connections": 4, "connection_timeout_s": 1.0})
    # 256 descriptors: 300 idle connections would exhaust them if each one kept a thread and a socket.
    command = ["prlimit", "--nofile=256:256", sys.executable, "-m", "agent"]
    agent = AgentProcess(config, local_broker, command=command).start()
    idle: list[socket.socket] = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=60))
        local_broker.restart()  # the agent must open a new socket to reconnect
        client = client_factory("alice")
        for conn in idle:  # the server closes every one: beyond the cap at once, the others when idle too long
            assert conn.recv(1) == b""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            assert b"edge_agent_intake_depth" in response.read()
        _still_serving(agent, client)
    finally:
        for conn in idle:
            conn.close()
        agent.stop()


def test_a_request_with_megabytes_of_user_properties_never_reaches_the_agent(
    tmp_path: Path, local_broker: MosquittoProcess, client_factory: Callable[..., DeviceClient]
) -> None:
    agent = AgentProcess(_config(tmp_path, local_broker), local_broker).start()
    try:
        # 3.5 MB of MQTT 5 user properties: paho parses them on its network thread in quadratic time (a
        # minute of a stalled agent) before any size check. The agent's CONNECT announces a Maximum Packet
        # Size, so the broker drops this publish instead of sending it.
        user_properties = [(f"k{i}".encode(), b"v" * 90) for i in range(35_000)]
        with _raw_mqtt5_connection(local_broker, "mallory") as hostile:
            hostile.sendall(_publish_with_user_properties(topics.request_topic("dev1", "mallory"), user_properties))
            hostile.sendall(b"\xc0\x00")  # PINGREQ: its PINGRESP says the broker has read the publish before it
            assert _receive(hostile, 2) == b"\xd0\x00"
        client = client_factory("alice")
        # Were the publish delivered, the agent's network thread would be busy parsing it far beyond the
        # client's reply timeout; the answers below come from an agent that never saw it.
        _still_serving(agent, client)
    finally:
        agent.stop()


@contextmanager
def _raw_mqtt5_connection(broker: MosquittoProcess, client_id: str) -> Iterator[socket.socket]:
    """A connected MQTT 5 session on a bare socket: paho's client packs properties in quadratic time (minutes
    for the megabytes above on a loaded machine), so the hostile client writes its packets itself."""
    name = client_id.encode()
    # Protocol name, level 5, clean start, keep-alive 60 s, no properties; the client id.
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + len(name).to_bytes(2, "big") + name
    with socket.create_connection((broker.host, broker.port), timeout=60) as sock:
        sock.sendall(b"\x10" + remaining_length(len(body)) + body)
        header = _receive(sock, 2)  # CONNACK and its length (under 128: a few properties)
        connack = _receive(sock, header[1])
        assert header[0] == 0x20 and connack[1] == 0, (header, connack)  # reason code 0: success
        yield sock


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the broker closed the connection"
        data += chunk
    return data


def _publish_with_user_properties(topic: str, user_properties: list[tuple[bytes, bytes]]) -> bytes:
    """A QoS 0 PUBLISH of ``{}`` carrying MQTT 5 user properties (identifier 0x26, a UTF-8 string pair each)."""
    properties = b"".join(
        b"\x26" + len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value
        for key, value in user_properties
    )
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name + remaining_length(len(properties)) + properties + b"{}"
    return b"\x30" + remaining_length(len(body)) + body


def test_requests_for_an_unreachable_cloud_hold_bounded_memory(
    tmp_path: Path, local_broker: MosquittoProcess, cloud_broker: MosquittoProcess,
    client_factory: Callable[..., DeviceClient],
) -> None:  # fmt: skip
    cloud_broker.stop()  # unreachable for the whole test: every forwarded request waits for its deadline
    cloud = {
        "host": cloud_broker.host, "port": cloud_broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5,
        "fallback_models": ["big-vision-model"], "fallback_max_pending_bytes": 4 * 1024 * 1024,
    }  # fmt: skip
    agent = AgentProcess(_config(tmp_path, local_broker, cloud=cloud), local_broker).start()
    try:
        big = {"model": "big-vision-model", "inputs": {"image": "x" * 900_000}, "timeout_ms": 3_600_000}
        clients = [client_factory(f"client-{n}") for n in range(6)]
        futures = [client.send("infer", big) for client in clients for _ in range(5)]
        # Six clients within their forwarding rate (a burst of 5 each) ask for 27 MB to be held for an hour:
        # the bound (4 MiB: four requests) refuses the rest at once, asking them to come back.
        # Which four are held depends on the order the agent serves its clients in.
        answered = threading.Semaphore(0)
        for future in futures:
            future.add_done_callback(lambda _: answered.release())
        assert all(answered.acquire(timeout=60) for _ in range(len(futures) - 4))
        refusals = [future.result() for future in futures if future.done()]
        assert len(refusals) == len(futures) - 4
        assert all(r["error"]["code"] == -32001 and r["error"]["data"]["retry_after_ms"] > 0 for r in refusals)
        _still_serving(agent, clients[0])
    finally:
        agent.stop()


def _hostile_cloud_config(tmp_path: Path, local: MosquittoProcess, cloud: HostileBroker) -> Path:
    values = {
        "host": cloud.host, "port": cloud.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
        "fallback_models": ["big-vision-model"],  # the agent subscribes to the cloud's answers
    }  # fmt: skip
    return _config(tmp_path, local, cloud=values)


@contextmanager
def _agent_on(
    tmp_path: Path, local: MosquittoProcess, cloud: HostileBroker, client_factory: Callable[..., DeviceClient]
) -> Iterator[tuple[AgentProcess, DeviceClient]]:
    """The real agent with ``cloud`` as its [cloud] broker, and a local client; the agent is stopped after."""
    agent = AgentProcess(_hostile_cloud_config(tmp_path, local, cloud), local).start()
    try:
        yield agent, client_factory("alice")
    finally:
        agent.stop()


def _answer_flood(qos: int, count: int = 65_000) -> bytes:
    """``count`` answers on the fallback topic for a request nobody made, packet ids wrapping around."""
    answer = b'{"jsonrpc":"2.0","msg_id":"none","result":{}}'
    topic = topics.cloud_reply_topic("dev1")
    return b"".join(publish_packet(topic, answer, qos=qos, packet_id=1 + n % 65535) for n in range(count))


def test_a_cloud_broker_flooding_qos2_messages_it_never_releases_is_cut_off(
    tmp_path: Path, local_broker: MosquittoProcess, client_factory: Callable[..., DeviceClient],
    hostile_broker: Callable[[Behaviour], HostileBroker],
) -> None:  # fmt: skip
    # 65,000 QoS 2 publishes and never a PUBREL: paho keeps every one until its release (724 MB measured).
    flood = _answer_flood(qos=2)

    def behaviour(connection: Connection) -> None:
        if connection.index < 2:  # then it behaves, so the test can see the agent came back
            connection.send(flood)

    cloud = hostile_broker(behaviour)
    with _agent_on(tmp_path, local_broker, cloud, client_factory) as (agent, client):
        assert cloud.wait_for_connections(3)
        first = cloud.connections[0]
        assert first.connect_properties is not None and first.connect_properties.ReceiveMaximum == 16
        assert first.closed_by_peer.wait(30) and cloud.connections[1].closed_by_peer.wait(30)
        log = agent.log_path.read_text()
        assert "cut off the cloud broker" in log and "QoS 2 messages awaiting release" in log, log
        assert _rss_mb(agent) < HOSTILE_CLOUD_RSS_MB
        _still_serving(agent, client)
        assert "'cloud_peer_violation': 2" in agent.log_path.read_text()


def test_a_cloud_answer_far_over_the_maximum_packet_size_is_never_read(
    tmp_path: Path, local_broker: MosquittoProcess, client_factory: Callable[..., DeviceClient],
    hostile_broker: Callable[[Behaviour], HostileBroker],
) -> None:  # fmt: skip
    # Three 200 MB answers on the fallback topic took the agent to 1.5 GB: paho reads a packet whole first.
    size = 200 * 1024 * 1024
    name = topics.cloud_reply_topic("dev1").encode()
    head = b"\x32" + remaining_length(size) + len(name).to_bytes(2, "big") + name + b"\x00\x01\x00"
    chunk = bytes(1024 * 1024)

    def behaviour(connection: Connection) -> None:
        if connection.index >= 3 or not connection.subscribed.wait(10) or not connection.send(head):
            return
        for _ in range(size // len(chunk)):
            if not connection.send(chunk):
                return

    cloud = hostile_broker(behaviour)
    with _agent_on(tmp_path, local_broker, cloud, client_factory) as (agent, client):
        assert cloud.wait_for_connections(4, timeout=60)
        announced = cloud.connections[0].connect_properties
        assert announced is not None and announced.MaximumPacketSize == 4 * 1024 * 1024 + 65536
        for connection in cloud.connections[:3]:
            assert connection.closed_by_peer.wait(30)
            assert connection.sent < size // 4  # cut off at the header: what got through sat in socket buffers
        assert "over the Maximum Packet Size" in agent.log_path.read_text()
        assert _rss_mb(agent) < HOSTILE_CLOUD_RSS_MB
        _still_serving(agent, client)


def test_a_cloud_broker_flooding_qos1_answers_is_acknowledged_without_holding_them(
    tmp_path: Path, local_broker: MosquittoProcess, client_factory: Callable[..., DeviceClient],
    hostile_broker: Callable[[Behaviour], HostileBroker],
) -> None:  # fmt: skip
    # QoS 1 needs no limit of its own: paho acknowledges each publish as it reads it and keeps nothing.
    flood = _answer_flood(qos=1)
    delivered = threading.Event()

    def behaviour(connection: Connection) -> None:
        if connection.subscribed.wait(10) and connection.send(flood):
            delivered.set()

    cloud = hostile_broker(behaviour)
    with _agent_on(tmp_path, local_broker, cloud, client_factory) as (agent, client):
        assert delivered.wait(60)  # the agent's socket took the whole flood
        assert _rss_mb(agent) < HOSTILE_CLOUD_RSS_MB
        _still_serving(agent, client)
        assert len(cloud.connections) == 1 and "cut off the cloud broker" not in agent.log_path.read_text()

"""An exception nothing expected, raised once in a callback or loop of a real agent, costs at most the one
request being handled (a -32603 reply, or an acknowledgement without one) and never a thread: afterwards the
agent still answers more QoS 1 requests from two clients than its Receive Maximum, so no PUBACK was lost.
A loop that hangs instead stops the systemd watchdog pings of a real agent process."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.app import Agent
from agent.faults import INTERNAL_ERRORS, Where
from agent.models import streams
from agent.models.streams import StreamTable
from agent.models.watcher import ModelWatcher
from agent.mqtt import local_link, topics
from agent.mqtt.local_link import LocalLink
from agent.mqtt.localbroker import MosquittoProcess
from agent.mqtt.transport import new_client
from agent.observe.memory import MemoryWatchdog
from agent.serving.admission import Admission
from agent.serving.fallback import CloudFallback
from agent.serving.pipeline import RequestPipeline
from agent.tools.client import DeviceClient
from agent.upstream.outbox_writer import OutboxWriter
from agent.upstream.uplink import Uplink
from agent.upstream.uplink_drain import Drain
from tests.fixtures.agents import AgentProcess, agent_overrides, write_config
from tests.test_hostile_peers import EXAMPLE

RECEIVE_MAXIMUM = 20


class Injected(RuntimeError):
    """The exception a test plants; nothing in the agent expects it."""


def _raise_once(original: Callable[..., Any], raised: threading.Event, *, after: bool) -> Callable[..., Any]:
    """``original``, except that its first call raises (before doing its work, or ``after`` it)."""

    def patched(*args: Any, **kwargs: Any) -> Any:
        if raised.is_set():
            return original(*args, **kwargs)
        raised.set()
        if after:
            original(*args, **kwargs)
        raise Injected("planted by the test")

    return patched


# How each case's exception is set off once the agent runs: "running" (by starting it, or a loop's next round),
# "request" (the next request; a model file change makes the watcher reload), "local_restart" and
# "cloud_restart" (a broker restarted under it), "cloud_answer" (a message on the fallback answer topic),
# "audited" (a request naming another client's Response Topic, a security event).
Trigger = Literal["running", "request", "local_restart", "cloud_restart", "cloud_answer", "audited"]
# where, owner, method, raise after the real work (a callback whose work must happen for the agent to start),
# trigger, and whether the agent needs a [cloud] link for it. Owner None: the agent's own paho client instance.
CASES: list[tuple[Where, Any, str, bool, Trigger, bool]] = [
    ("local_message", local_link.topics, "client_id_from_request_topic", False, "request", False),
    ("local_connect", LocalLink, "_on_connect", True, "running", False),
    ("local_disconnect", LocalLink, "_on_disconnect", True, "local_restart", False),
    ("local_subscribe", LocalLink, "_on_subscribe", True, "running", False),
    ("local_publish", LocalLink, "_on_publish", True, "request", False),
    ("intake", Admission, "check", False, "request", False),
    ("worker", RequestPipeline, "serve", False, "request", False),
    ("reply", None, "publish", False, "request", False),
    ("memory_watchdog", MemoryWatchdog, "check", False, "request", False),
    ("model_watcher", ModelWatcher, "poll", False, "request", False),
    ("stream_sweeper", StreamTable, "sweep", False, "running", False),  # rounds every 0.5 s here, not 10 s
    ("audit_sink", Agent, "_send_audit_upstream", False, "audited", False),
    ("uplink_connect", Uplink, "_on_connect", True, "running", True),
    ("uplink_disconnect", Uplink, "_on_disconnect", True, "cloud_restart", True),
    ("uplink_connection", Uplink, "_connection_lost", False, "cloud_restart", True),
    ("uplink_publish", Uplink, "_on_publish", True, "request", True),
    ("uplink_message", CloudFallback, "on_cloud_message", False, "cloud_answer", True),
    ("uplink_drain", Drain, "_claim_more", False, "request", True),
    ("outbox_writer", OutboxWriter, "_execute", False, "request", True),
    ("fallback_expiry", CloudFallback, "_expire_round", False, "running", True),
]
# Planted elsewhere: in the deployer, which runs only with deployment keys provisioned
# (tests/test_deploy_machine.py), and in the signing key's rotation, on its own clock (tests/test_signing.py).


def _set_off(
    trigger: Trigger, agent: Agent, client: DeviceClient, local: MosquittoProcess, cloud: MosquittoProcess | None
) -> None:
    if trigger == "request":
        (Path(agent.settings.models_dir) / "touched").write_text("x")
    elif trigger == "local_restart":
        local.restart()
    elif trigger == "cloud_restart":
        assert cloud is not None
        cloud.restart()
    elif trigger == "cloud_answer":
        assert cloud is not None
        answerer = new_client("cloud-service")
        answerer.connect(cloud.host, cloud.port)
        answerer.loop_start()
        answer = b'{"jsonrpc":"2.0","msg_id":"nobody-asked","result":{}}'
        answerer.publish(topics.cloud_reply_topic("dev1"), answer, qos=1).wait_for_publish(10)
        answerer.disconnect()
        answerer.loop_stop()
    elif trigger == "audited":
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "mcp/res/dev1/someone-else"
        client.publish_raw(b'{"jsonrpc":"2.0","id":"a","method":"ping"}', properties=props)


def _outbox_drained(agent: Agent) -> bool:
    """Every upstream copy delivered: the writer, the drain and the connection thread all still work."""
    assert agent.upstream is not None and agent.dispatcher is not None
    deadline = time.monotonic() + 30
    # The pings can all be answered while the sacrificed request still waits for its model to load, and its
    # copy is stored only then: an empty outbox before that proves nothing (and a copy stored between two
    # looks failed the test). An idle dispatcher has stored every copy (it counts them until committed).
    agent.dispatcher.drain(deadline)
    while (messages := agent.upstream.outbox.stats().messages) and time.monotonic() < deadline:
        time.sleep(0.1)
    return messages == 0


@pytest.mark.parametrize(
    ("where", "owner", "method", "after", "trigger", "cloud"), CASES, ids=[case[0] for case in CASES]
)
def test_an_unexpected_exception_costs_one_answer_at_most_and_never_a_thread(
    where: Where, owner: Any, method: str, after: bool, trigger: Trigger, cloud: bool,
    start_agent, client_factory, local_broker, request, monkeypatch,
) -> None:  # fmt: skip
    raised = threading.Event()
    if where == "stream_sweeper":  # its first round would be 10 s in: the test would wait for nothing else
        monkeypatch.setattr(streams, "SWEEP_INTERVAL_S", 0.5)
    if owner is not None:
        monkeypatch.setattr(owner, method, _raise_once(getattr(owner, method), raised, after=after))
    before = INTERNAL_ERRORS.counts()[where]
    cloud_broker: MosquittoProcess | None = request.getfixturevalue("cloud_broker") if cloud else None
    extra: dict[str, Any] = {}
    if cloud_broker is not None:
        extra["cloud"] = {
            "host": cloud_broker.host, "port": cloud_broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5,
            "fallback_models": ["big-vision-model"],
        }  # fmt: skip
    agent = start_agent(limits={"receive_maximum": RECEIVE_MAXIMUM}, models_poll_s=0.2, **extra)
    if owner is None:  # the link's paho client: patched on the instance, so the test's own clients are spared
        client = agent.link.client
        monkeypatch.setattr(client, method, _raise_once(getattr(client, method), raised, after=after))
    first, second = client_factory("first"), client_factory("second")
    if not raised.is_set():
        _set_off(trigger, agent, first, local_broker, cloud_broker)
        sacrificed = first.send("infer", {"model": "vibration-anomaly", "inputs": EXAMPLE})
        assert raised.wait(30)
        if where in ("intake", "worker"):
            reply = sacrificed.result(30)
            assert reply["error"]["code"] == -32603, reply
    futures = [client.send("ping") for _ in range(RECEIVE_MAXIMUM + 5) for client in (first, second)]
    replies = [future.result(30) for future in futures]
    assert all(reply.get("result") is not None for reply in replies), replies[:3]
    assert INTERNAL_ERRORS.counts()[where] == before + 1
    assert agent.threads_alive()
    if cloud:
        assert _outbox_drained(agent), agent.upstream.outbox.stats() if agent.upstream else None
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert f'edge_agent_internal_errors_total{{where="{where}"}} {float(before + 1)}' in text


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A real AF_UNIX datagram socket standing in for systemd's notification socket."""
    directory = tempfile.mkdtemp(prefix="notify-")  # short: AF_UNIX paths are limited to 108 bytes
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    yield sock, path
    sock.close()
    shutil.rmtree(directory)


def _next_message(sock: socket.socket, wanted: Callable[[str], bool]) -> list[str]:
    """Every notification up to and including the first one ``wanted`` accepts."""
    seen: list[str] = []
    while True:
        message = sock.recv(4096).decode()
        seen.append(message)
        if wanted(message):
            return seen


def test_a_hung_loop_stops_the_watchdog_pings(tmp_path, local_broker, models_dir, notify_socket, monkeypatch) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # a round running longer than 2 s is a hang
    values = agent_overrides(local_broker, models_dir, tmp_path / "data", models_poll_s=0.2)
    values["limits"] = {"receive_maximum": RECEIVE_MAXIMUM}  # a subprocess: the profile's memory limits apply
    agent = AgentProcess(write_config(tmp_path / "agent.toml", values), local_broker).start()
    try:
        _next_message(sock, lambda message: message == "WATCHDOG=1")
        # A manifest replaced by a FIFO: the model watcher's next reload blocks reading it.
        manifest = models_dir / "manifest.json"
        content = manifest.read_bytes()
        manifest.unlink()
        os.mkfifo(manifest)
        seen = _next_message(sock, lambda message: message.startswith("STATUS=stalled"))
        assert "model-watcher" in seen[-1]
        # Stalled: no ping in the next three rounds of the main loop (one a second) ...
        sock.settimeout(3.5)
        with pytest.raises(TimeoutError):
            _next_message(sock, lambda message: message == "WATCHDOG=1")
        # ... until the loop gets its manifest and comes back.
        sock.settimeout(30)
        with open(manifest, "wb") as writer:
            writer.write(content)
        (models_dir / "manifest.new").write_bytes(content)
        os.replace(models_dir / "manifest.new", manifest)
        _next_message(sock, lambda message: message == "WATCHDOG=1")
    finally:
        agent.stop()

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
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.faults import INTERNAL_ERRORS, Where
from agent.models.watcher import ModelWatcher
from agent.mqtt import local_link
from agent.mqtt.local_link import LocalLink
from agent.observe.memory import MemoryWatchdog
from agent.serving.admission import Admission
from agent.serving.pipeline import RequestPipeline
from tests.fixtures.agents import AgentProcess, agent_overrides, write_config

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


# where, owner, method, raise after the real work (a callback whose work must happen for the agent to start)
CASES: list[tuple[Where, Any, str, bool]] = [
    ("local_message", local_link.topics, "client_id_from_request_topic", False),
    ("local_connect", LocalLink, "_on_connect", True),
    ("local_subscribe", LocalLink, "_on_subscribe", True),
    ("local_publish", LocalLink, "_on_publish", True),
    ("intake", Admission, "check", False),
    ("worker", RequestPipeline, "serve", False),
    ("memory_watchdog", MemoryWatchdog, "check", False),
    ("model_watcher", ModelWatcher, "poll", False),
]


@pytest.mark.parametrize(("where", "owner", "method", "after"), CASES, ids=[case[0] for case in CASES])
def test_an_unexpected_exception_costs_one_answer_at_most_and_never_a_thread(
    where: Where, owner: Any, method: str, after: bool, start_agent, client_factory, monkeypatch
) -> None:
    raised = threading.Event()
    monkeypatch.setattr(owner, method, _raise_once(getattr(owner, method), raised, after=after))
    before = INTERNAL_ERRORS.counts()[where]
    agent = start_agent(limits={"receive_maximum": RECEIVE_MAXIMUM}, models_poll_s=0.2)
    first, second = client_factory("first"), client_factory("second")
    if not raised.is_set():
        # The request path raises on the next request; the loops on their next round (a model file change
        # makes the watcher reload).
        (Path(agent.settings.models_dir) / "touched").write_text("x")
        sacrificed = first.send("ping")
        assert raised.wait(30)
        if where in ("intake", "worker"):
            reply = sacrificed.result(30)
            assert reply["error"]["code"] == -32603, reply
    futures = [client.send("ping") for _ in range(RECEIVE_MAXIMUM + 5) for client in (first, second)]
    replies = [future.result(30) for future in futures]
    assert all(reply.get("result") is not None for reply in replies), replies[:3]
    assert INTERNAL_ERRORS.counts()[where] == before + 1
    assert agent.threads_alive()
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

"""Issue #12: a local broker that ignores the limits the agent announced in its CONNECT is cut off, and one that
honours them never is.

The hostile broker (tests/fixtures/hostile_broker.py) is a real MQTT 5 server on a socket: the agent runs in
process against it, and each test checks that the link was cut (counted as ``local_peer_violation``, logged)
and that on its next connection, where the same broker behaves, the agent answers a request and acknowledges
it. The legitimate side runs the local link on a real mosquitto with every request held to the last moment, so
exactly Receive Maximum of them are in flight, also across a broker restart that redelivers them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from agent.app import Agent
from agent.config import LocalBroker
from agent.exchange import InboundRequest, OutgoingReply
from agent.mqtt import topics
from agent.mqtt.local_link import LocalLink
from agent.mqtt.localbroker import MosquittoProcess
from agent.tools.client import DeviceClient
from tests.fixtures.agents import started_agents
from tests.fixtures.hostile_broker import Behaviour, Connection, HostileBroker, publish_packet, remaining_length

RECEIVE_MAXIMUM = 8
_REQUESTS = topics.request_topic("dev1", "mallory")


def _request(packet_id: int, *, dup: bool = False, request_id: str = "r") -> bytes:
    payload = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "ping"}).encode()
    packet = publish_packet(_REQUESTS, payload, qos=1, packet_id=packet_id)
    return bytes([packet[0] | (0x08 if dup else 0)]) + packet[1:]


@pytest.fixture
def agent_on(
    hostile_broker: Callable[[Behaviour], HostileBroker], models_dir: Path, tmp_path: Path
) -> Iterator[Callable[[Behaviour], tuple[Agent, HostileBroker]]]:
    """Start an in-process agent whose local broker is a hostile broker with ``behaviour`` on its first
    connection (later connections behave), optionally with ``[local] enforce_receive_maximum``."""
    with ExitStack() as stack:

        def run(behaviour: Behaviour, enforce_receive_maximum: bool = False) -> tuple[Agent, HostileBroker]:
            broker = hostile_broker(lambda connection: behaviour(connection) if connection.index == 0 else None)
            start = stack.enter_context(started_agents(broker, models_dir, tmp_path / "data"))  # type: ignore[arg-type]
            local = {"reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "enforce_receive_maximum": enforce_receive_maximum}
            return start(local=local, limits={"receive_maximum": RECEIVE_MAXIMUM}), broker

        yield run


def _cut_off_then_serving(agent: Agent, broker: HostileBroker, caplog: pytest.LogCaptureFixture, why: str) -> None:
    """The first connection was cut for ``why``, counted and logged; on the next one a request is answered and
    acknowledged."""
    assert broker.wait_for_connections(2)
    assert broker.connections[0].closed_by_peer.wait(30)
    assert agent.counters["local_peer_violation"] == 1
    cut = [r.getMessage() for r in caplog.records if "cut off the local broker" in r.getMessage()]
    assert len(cut) == 1 and why in cut[0], cut
    behaving = broker.connections[1]
    assert behaving.subscribed.wait(30)
    assert behaving.send(_request(4242, request_id="probe"))
    reply_topic = topics.reply_topic("dev1", "mallory")
    assert behaving.wait_for(
        lambda c: 4242 in c.acknowledged and any(t == reply_topic and b'"probe"' in p for t, p in c.published)
    )
    assert not behaving.closed_by_peer.is_set() and len(broker.connections) == 2


def test_more_unacknowledged_requests_than_receive_maximum_are_refused_where_enforced(
    agent_on: Callable[..., tuple[Agent, HostileBroker]], caplog: pytest.LogCaptureFixture
) -> None:
    def flood(connection: Connection) -> None:
        connection.subscribed.wait(10)
        connection.acknowledging = False  # the agent's replies stay unacknowledged, so its requests stay held
        connection.send(b"".join(_request(n) for n in range(1, RECEIVE_MAXIMUM + 2)))

    caplog.set_level(logging.INFO)
    agent, broker = agent_on(flood, enforce_receive_maximum=True)
    _cut_off_then_serving(agent, broker, caplog, f"more than {RECEIVE_MAXIMUM} messages awaiting acknowledgement")


def test_a_packet_over_the_maximum_packet_size_is_refused_from_its_header(
    agent_on: Callable[[Behaviour], tuple[Agent, HostileBroker]], caplog: pytest.LogCaptureFixture
) -> None:
    size = 200 * 1024 * 1024
    name = _REQUESTS.encode()
    head = b"\x32" + remaining_length(size) + len(name).to_bytes(2, "big") + name + b"\x00\x01\x00"
    chunk = bytes(1024 * 1024)

    def oversized(connection: Connection) -> None:
        if not connection.subscribed.wait(10) or not connection.send(head):
            return
        for _ in range(size // len(chunk)):
            if not connection.send(chunk):
                return

    caplog.set_level(logging.INFO)
    agent, broker = agent_on(oversized)
    _cut_off_then_serving(agent, broker, caplog, "over the Maximum Packet Size")
    announced = broker.connections[0].connect_properties
    assert announced is not None and announced.MaximumPacketSize == agent.settings.limits.max_packet_bytes
    assert broker.connections[0].sent < size // 4  # cut at the header: what got through sat in socket buffers


def test_a_packet_identifier_reused_before_its_acknowledgement_is_refused(
    agent_on: Callable[[Behaviour], tuple[Agent, HostileBroker]], caplog: pytest.LogCaptureFixture
) -> None:
    def reuse(connection: Connection) -> None:
        connection.subscribed.wait(10)
        connection.acknowledging = False
        # A DUP resend of a held request is allowed; the same identifier for a new one is not.
        connection.send(_request(5) + _request(5, dup=True) + _request(6) + _request(5))

    caplog.set_level(logging.INFO)
    agent, broker = agent_on(reuse)
    _cut_off_then_serving(agent, broker, caplog, "packet identifier 5 again before we acknowledged it")


def test_a_qos2_request_with_the_packet_identifier_0_is_refused_not_acknowledged(
    agent_on: Callable[[Behaviour], tuple[Agent, HostileBroker]], caplog: pytest.LogCaptureFixture
) -> None:
    payload = json.dumps({"jsonrpc": "2.0", "id": "zero", "method": "ping"}).encode()

    def zero(connection: Connection) -> None:
        connection.subscribed.wait(10)
        connection.send(publish_packet(_REQUESTS, payload, qos=2, packet_id=0))  # MQTT forbids 0 for QoS > 0

    caplog.set_level(logging.INFO)
    agent, broker = agent_on(zero)
    _cut_off_then_serving(agent, broker, caplog, "a QoS 2 PUBLISH with the packet identifier 0")
    assert not any(b'"zero"' in sent for connection in broker.connections for _, sent in connection.published)


class HoldingSink:
    """Takes requests from the link and keeps each until the test answers it (a slow service, to the last moment)."""

    def __init__(self) -> None:
        self.held: list[InboundRequest] = []
        self._changed = threading.Condition()

    def submit(self, inbound: InboundRequest) -> None:
        with self._changed:
            self.held.append(inbound)
            self._changed.notify_all()

    def wait_held(self, count: int, timeout: float = 30.0) -> list[InboundRequest]:
        """Wait until ``count`` requests are held; take them all."""
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.held) >= count, timeout), (len(self.held), count)
            taken, self.held = self.held, []
            return taken


def _answer(link: LocalLink, held: list[InboundRequest]) -> None:
    for inbound in held:
        request = json.loads(inbound.payload)
        reply = json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": {}}).encode()
        link.publish_reply(OutgoingReply(inbound, topics.reply_topic("dev1", inbound.client_id), reply))


def _acknowledgements_read(link: LocalLink) -> None:
    """Wait until the broker has read every PUBACK the link sent. The client has its replies before that, and a
    PUBACK still on its way when the next burst queues at the broker sets off mosquitto 2.0.11's overshoot (all
    of it sent at once). The broker reads a connection's packets in order: a QoS 1 publish after them is a barrier."""
    deadline = time.monotonic() + 30
    while link.client.inbound.awaiting_ack and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not link.client.inbound.awaiting_ack
    # Twice: an identifier leaves awaiting_ack just before its PUBACK is queued, on the network thread, which
    # handles the first barrier's PUBACK only after that; the second is queued after every one of them.
    for _ in range(2):
        barrier = link.client.publish("tests/barrier", b"", qos=1)
        barrier.wait_for_publish(30)
        assert barrier.is_published()


def _serve(link: LocalLink, sink: HoldingSink, count: int, *, window: int | None = None) -> int:
    """Answer ``count`` requests as they arrive, never refused by the guard; ``window``: each round waits for a
    full window of that many (what is left at the end) and finds exactly as many held. The most held at once."""
    answered: set[str] = set()
    most = 0
    while len(answered) < count:
        held = sink.wait_held(min(window, count - len(answered)) if window else 1)
        in_flight = len(link.client.inbound.awaiting_ack)
        assert link.client.inbound.violation is None and len(held) <= in_flight, (len(held), in_flight)
        assert window is None or in_flight == len(held) <= window, (len(held), in_flight)
        most = max(most, in_flight)
        _answer(link, held)
        answered.update(json.loads(inbound.payload)["id"] for inbound in held)
    return most


@pytest.fixture
def holding_link(local_broker: MosquittoProcess) -> Iterator[Callable[[bool], tuple[LocalLink, HoldingSink]]]:
    """Start the local link on the real broker with a :class:`HoldingSink`, optionally enforcing Receive Maximum;
    closed at teardown. It must never have cut the broker off."""
    started: list[tuple[LocalLink, Counter[str]]] = []

    def start(enforce_receive_maximum: bool) -> tuple[LocalLink, HoldingSink]:
        counts: Counter[str] = Counter()
        broker = LocalBroker(
            host=local_broker.host, port=local_broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5,
            enforce_receive_maximum=enforce_receive_maximum,
        )  # fmt: skip
        link = LocalLink(
            broker, "dev1", receive_maximum=RECEIVE_MAXIMUM, max_packet_bytes=1 << 16, on_connected=lambda: None,
            count=lambda name: counts.update([name]),
        )  # fmt: skip
        sink = HoldingSink()
        link.start(sink, ready_timeout=30)
        started.append((link, counts))
        return link, sink

    yield start
    for link, counts in started:
        link.close()
        assert counts["local_peer_violation"] == 0 and link.client.inbound.violation is None, counts


def test_an_enforced_receive_maximum_takes_a_full_window_of_requests_also_redelivered_after_a_restart(
    local_broker: MosquittoProcess, client_factory: Callable[..., DeviceClient],
    holding_link: Callable[[bool], tuple[LocalLink, HoldingSink]],
) -> None:  # fmt: skip
    link, sink = holding_link(True)
    client = client_factory("alice", session_expiry=600)
    for _ in range(2):  # a burst of exactly the window, served; then another
        burst = [client.send("ping") for _ in range(RECEIVE_MAXIMUM)]
        assert _serve(link, sink, len(burst), window=RECEIVE_MAXIMUM) == RECEIVE_MAXIMUM
        assert all(future.result(30)["result"] == {} for future in burst)
    # A full window held when the broker restarts: it redelivers the window (DUP) on the new connection, where the
    # old connection's acknowledgements are void and its identifiers forgotten.
    burst = [client.send("ping") for _ in range(RECEIVE_MAXIMUM)]
    assert len(sink.wait_held(RECEIVE_MAXIMUM)) == RECEIVE_MAXIMUM == len(link.client.inbound.awaiting_ack)
    local_broker.restart()
    assert _serve(link, sink, len(burst), window=RECEIVE_MAXIMUM) == RECEIVE_MAXIMUM
    assert all(future.result(30)["result"] == {} for future in burst)


def test_a_legit_broker_is_never_cut_off_by_default_even_with_requests_queued_across_a_restart(
    local_broker: MosquittoProcess, client_factory: Callable[..., DeviceClient],
    holding_link: Callable[[bool], tuple[LocalLink, HoldingSink]],
) -> None:  # fmt: skip
    # By default unacknowledged requests are tracked (their identifiers) but not held to Receive Maximum: mosquitto
    # 2.0.11 moves every queued request into flight on the first PUBACK after a burst larger than the window.
    link, sink = holding_link(False)
    client = client_factory("alice", session_expiry=600)
    first = [client.send("ping") for _ in range(3 * RECEIVE_MAXIMUM)]
    _serve(link, sink, len(first))
    assert all(future.result(30)["result"] == {} for future in first)
    _acknowledgements_read(link)
    # A full window held and the rest queued in the persistent session when the broker restarts.
    second = [client.send("ping") for _ in range(3 * RECEIVE_MAXIMUM)]
    assert len(sink.wait_held(RECEIVE_MAXIMUM)) == RECEIVE_MAXIMUM == len(link.client.inbound.awaiting_ack)
    local_broker.restart()
    _serve(link, sink, len(second))
    assert all(future.result(30)["result"] == {} for future in second)

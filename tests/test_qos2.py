"""QoS 2 against real brokers: a request published at QoS 2, the acknowledgements of QoS 2 messages a
manual-ack client receives (the local link's and the ingest worker's kind), and received QoS 2 state across
reconnects, restarts and a broker that kept no session."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import CloudBroker
from agent.mqtt import topics
from agent.mqtt.localbroker import MosquittoProcess
from agent.mqtt.transport import AckSequencer, connect_properties, new_client
from agent.upstream.outbox import Outbox
from agent.upstream.uplink import CloudMessage, Uplink
from tests.fixtures.hostile_broker import Behaviour, Connection, HostileBroker, publish_packet


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached"
        time.sleep(0.02)


class Recorder:
    """What one paho client received, for any thread to wait on."""

    def __init__(self) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()

    def add(self, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[mqtt.MQTTMessage]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.messages) >= count, timeout), (
                f"{len(self.messages)} of {count} messages arrived"
            )
            return list(self.messages)


def test_a_request_published_at_qos2_is_answered_once_and_its_flow_completes(
    start_agent: Callable[..., Any], local_broker: MosquittoProcess
) -> None:
    # The client's QoS 2 flow runs with the broker (PUBREC, PUBREL, PUBCOMP); the agent subscribes at QoS 1,
    # so the broker hands the request on at QoS 1, and the agent acknowledges it once it is answered.
    agent = start_agent()
    replies = Recorder()
    subscribed = threading.Event()
    client = new_client("qos2-client")
    client.on_message = lambda c, u, message: replies.add(message)
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_connect = lambda c, u, f, r, p: c.subscribe(topics.reply_topic("dev1", "qos2-client"), qos=2)
    client.connect(local_broker.host, local_broker.port)
    client.loop_start()

    def request(request_id: int) -> None:
        payload = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "ping"})
        info = client.publish(topics.request_topic("dev1", "qos2-client"), payload, qos=2)
        info.wait_for_publish(10)
        assert info.is_published()  # paho reports a QoS 2 publish done once its PUBCOMP arrived

    try:
        assert subscribed.wait(10)
        request(1)
        replies.wait_for(1)
        agent.stop()
        start_agent()  # takes over the session: request 1 is finished there and must not come again
        request(2)
        # Anything left of request 1 in the session would reach the new agent before request 2.
        replies.wait_for(2)
        assert [json.loads(m.payload)["id"] for m in replies.messages] == [1, 2]
    finally:
        client.disconnect()
        client.loop_stop()


class ManualAckSubscriber:
    """A QoS 2 subscriber that acknowledges like the local link: ``manual_ack`` and an :class:`AckSequencer`;
    the test says when each message is done."""

    def __init__(self, broker: MosquittoProcess, client_id: str, receive_maximum: int) -> None:
        self.received: list[tuple[mqtt.MQTTMessage, int]] = []  # and the acknowledgement generation
        self._cond = threading.Condition()
        self.client = new_client(client_id, manual_ack=True, lean=True)
        self.acks = AckSequencer(self.client)
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe("jobs/#", qos=2)
        self.client.on_disconnect = lambda *args: self.acks.reset()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.3)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect(
            broker.host, broker.port, clean_start=False, properties=connect_properties(3600, receive_maximum)
        )
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.acks.received(message.mid, message.qos)
            self.received.append((message, self.acks.generation))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[bytes]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.received) >= count, timeout), (
                f"{len(self.received)} of {count} messages arrived: {self.payloads()}"
            )
            return self.payloads()

    def payloads(self) -> list[bytes]:
        return [message.payload for message, _ in self.received]

    def finish(self, index: int) -> None:
        message, generation = self.received[index]
        self.acks.done(message.mid, generation)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def qos2_publisher(broker: MosquittoProcess) -> Iterator[Callable[[bytes], None]]:
    client = new_client("jobs-publisher")
    client.connect(broker.host, broker.port)
    client.loop_start()

    def publish(payload: bytes) -> None:
        info = client.publish("jobs/a", payload, qos=2)
        info.wait_for_publish(10)
        assert info.is_published()

    try:
        yield publish
    finally:
        client.disconnect()
        client.loop_stop()


def test_qos2_messages_are_completed_in_arrival_order_and_not_redelivered_after_a_restart(
    local_broker: MosquittoProcess,
) -> None:
    # A PUBACK in place of the PUBCOMP is a protocol error to mosquitto: it disconnects the client, and the
    # unfinished messages fill the Receive Maximum for good, so nothing more is delivered.
    with qos2_publisher(local_broker) as publish:
        first = ManualAckSubscriber(local_broker, "worker", receive_maximum=2)
        try:
            for n in range(4):
                publish(b"job-%d" % n)
            assert first.wait_for(2) == [b"job-0", b"job-1"]  # the Receive Maximum holds the rest back
            first.finish(1)
            first.finish(0)
            assert first.wait_for(4) == [b"job-0", b"job-1", b"job-2", b"job-3"]
            first.finish(3)
            first.finish(2)
            wait_until(lambda: first.acks.pending() == 0)
        finally:
            first.close()
        second = ManualAckSubscriber(local_broker, "worker", receive_maximum=2)
        try:
            for n in range(4, 7):
                publish(b"job-%d" % n)
                second.wait_for(n - 3)
                second.finish(n - 4)
            # Anything left of the first four in the session would have come before these.
            assert second.payloads() == [b"job-4", b"job-5", b"job-6"]
        finally:
            second.close()


def test_a_qos2_message_released_to_an_earlier_process_is_completed_by_the_next(
    local_broker: MosquittoProcess,
) -> None:
    # The first worker got the message (its PUBREL) and stopped before it was done: the broker sends the
    # PUBREL again to the next one, which has never heard of that packet id. Unanswered, it would hold the
    # one-message Receive Maximum forever.
    with qos2_publisher(local_broker) as publish:
        first = ManualAckSubscriber(local_broker, "worker", receive_maximum=1)
        try:
            publish(b"unfinished")
            first.wait_for(1)
        finally:
            first.close()
        second = ManualAckSubscriber(local_broker, "worker", receive_maximum=1)
        try:
            publish(b"next")
            assert second.wait_for(1) == [b"next"]
        finally:
            second.close()


def _release(packet_id: int) -> bytes:
    return b"\x62\x02" + packet_id.to_bytes(2, "big")


def test_a_broker_that_kept_no_session_is_not_held_to_the_old_sessions_unreleased_messages(
    tmp_path: Path, hostile_broker: Callable[[Behaviour], HostileBroker]
) -> None:
    # The cloud broker left four QoS 2 messages unreleased (its Receive Maximum), then restarted without
    # persistence: its CONNACK says no session, and it numbers its packets afresh. Counting the old four
    # as still awaiting release would cut off a broker that did nothing wrong.
    topic = "mcp/cloud/res/dev-1"

    def behaviour(connection: Connection) -> None:
        if not connection.subscribed.wait(10):
            return
        if connection.index == 0:
            connection.send(b"".join(publish_packet(topic, b"old-%d" % n, qos=2, packet_id=n) for n in range(1, 5)))
            connection.sock.shutdown(socket.SHUT_WR)  # the broker goes away; every byte sent is still read
            return
        if connection.index == 1:
            fresh = range(101, 105)  # four awaiting release at once: within the Receive Maximum
            connection.send(b"".join(publish_packet(topic, b"new-%d" % n, qos=2, packet_id=n) for n in fresh))
            connection.send(b"".join(_release(n) for n in fresh))
            for n in range(1, 5):  # the old session's ids, now new messages
                connection.send(publish_packet(topic, b"reused-%d" % n, qos=2, packet_id=n) + _release(n))

    cloud = hostile_broker(behaviour)
    settings = CloudBroker(
        host=cloud.host, port=cloud.port, reconnect_min_s=0.05, reconnect_max_s=0.3, batch=False, receive_maximum=4
    )
    outbox = Outbox(tmp_path / "outbox.db")
    uplink = Uplink(outbox, settings, "dev-1")
    received: list[CloudMessage] = []
    uplink.subscribe(topic, received.append)
    uplink.start()
    try:
        assert cloud.wait_for_connections(2)
        expected = [b"new-%d" % n for n in range(101, 105)] + [b"reused-%d" % n for n in range(1, 5)]
        wait_until(lambda: len(received) >= len(expected), what="the new session's messages")
        assert [m.payload for m in received] == expected
        assert uplink.stats().peer_violations == 0
    finally:
        uplink.stop()
        outbox.close()

"""The chunked reads of every paho client the agent makes (agent.mqtt.chunked.ChunkedReadClient), against a
real mosquitto: packets that arrived together are read with one ``recv`` and none is left behind in the chunk."""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.mqtt.chunked import ChunkedReadClient
from agent.mqtt.inbound_guard import InboundLimits
from agent.mqtt.localbroker import MosquittoProcess
from agent.mqtt.transport import new_client, new_guarded_client
from tests.fixtures.wakeups import CountingWakeups

MESSAGES = 2000
# The responders (plain), the local link (lean: its own decoding of PUBLISH and PUBACK), and the uplink
# (guarded: the cloud is input too).
CLIENTS = {
    "plain": new_client,
    "lean": lambda client_id: new_client(client_id, lean=True),
    "guarded": lambda client_id: new_guarded_client(client_id, InboundLimits(max_packet_bytes=1 << 20, receive_maximum=64)),
}


def _subscriber(
    broker: MosquittoProcess, received: list[bytes], done: threading.Event, kind: str = "plain"
) -> ChunkedReadClient:
    client = CLIENTS[kind]("chunked-subscriber")
    subscribed = threading.Event()
    client.on_connect = lambda c, u, f, r, p: c.subscribe("chunked/#", qos=1)
    client.on_subscribe = lambda *args: subscribed.set()

    def on_message(c: Any, u: Any, message: mqtt.MQTTMessage) -> None:
        received.append(message.payload)
        if len(received) == MESSAGES:
            done.set()

    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert subscribed.wait(10)
    return client


def _publish_burst(broker: MosquittoProcess) -> None:
    publisher = new_client("chunked-publisher")
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()
    infos = [publisher.publish(f"chunked/{index}", f"message {index:05d}".encode() * 4, qos=1) for index in range(MESSAGES)]
    for info in infos:
        info.wait_for_publish(10)
    publisher.disconnect()
    publisher.loop_stop()


@pytest.mark.parametrize("kind", sorted(CLIENTS))
def test_a_burst_that_waited_unread_is_read_in_chunks_and_delivered_whole(local_broker: MosquittoProcess, kind: str) -> None:
    received: list[bytes] = []
    done = threading.Event()
    client = _subscriber(local_broker, received, done, kind)
    reads = 0
    paho_recv = mqtt.Client._sock_recv

    def counting_recv(self: mqtt.Client, bufsize: int) -> bytes:
        nonlocal reads
        reads += 1
        return paho_recv(self, bufsize)

    client.loop_stop()  # the burst piles up unread in the socket, as behind a busy network thread
    _publish_burst(local_broker)
    deadline = time.monotonic() + 10
    while client.unread_bytes() < 1000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.unread_bytes() >= 1000, "the burst should be waiting in the socket"
    mqtt.Client._sock_recv = counting_recv  # type: ignore[method-assign]
    try:
        client.loop_start()
        # No more traffic follows the burst: a packet left in the chunk would wait for the next keepalive.
        assert done.wait(30), f"{len(received)} of {MESSAGES} delivered"
    finally:
        mqtt.Client._sock_recv = paho_recv  # type: ignore[method-assign]
    assert sorted(received) == sorted(f"message {index:05d}".encode() * 4 for index in range(MESSAGES))
    # paho alone reads each PUBLISH with three calls (6,000 here); a chunk holds hundreds of them.
    assert reads < MESSAGES / 10, f"{reads} socket reads for {MESSAGES} messages"
    assert client.unread_bytes() == 0
    client.disconnect()
    client.loop_stop()


def test_unread_bytes_is_zero_without_a_connection() -> None:
    assert new_client("never-connected").unread_bytes() == 0


def test_publishing_together_wakes_the_network_thread_once_and_delivers_everything(
    local_broker: MosquittoProcess,
) -> None:
    received: list[bytes] = []
    done = threading.Event()
    subscriber = _subscriber(local_broker, received, done)
    publisher = new_client("together-publisher")
    connected = threading.Event()
    publisher.on_connect = lambda *args: connected.set()
    publisher.max_inflight_messages_set(0)  # no limit: the network thread itself never queues a publish
    publisher.connect(local_broker.host, local_broker.port)
    publisher.loop_start()
    assert connected.wait(10)
    wakeups = CountingWakeups(publisher._sockpairW)
    publisher._sockpairW = wakeups  # type: ignore[assignment]
    messages = [f"message {index:05d}".encode() for index in range(MESSAGES)]
    sent = threading.Event()

    def publish_from_another_thread() -> None:  # as the outbox writer does, beside paho's network thread
        with publisher.publishing_together(), publisher.publishing_together():
            for index, message in enumerate(messages[:-1]):
                publisher.publish(f"chunked/{index}", message, qos=1)
        assert wakeups.sends == 1
        publisher.publish(f"chunked/{MESSAGES - 1}", messages[-1], qos=1)  # outside: paho's own wake-up
        sent.set()

    threading.Thread(target=publish_from_another_thread).start()
    assert sent.wait(30)
    assert done.wait(30), f"{len(received)} of {MESSAGES} delivered"
    assert sorted(received) == sorted(messages)
    assert wakeups.sends == 2
    for client in (publisher, subscriber):
        client.disconnect()
        client.loop_stop()


def test_the_backlog_as_of_the_last_read_counts_what_the_kernel_held_then(local_broker: MosquittoProcess) -> None:
    # The inline-serving check asks on every message; it is answered from the last socket read, no system call.
    received: list[bytes] = []
    done = threading.Event()
    client = _subscriber(local_broker, received, done)
    seen: list[tuple[int, int]] = []
    deliver = client.on_message

    def on_message(c: Any, u: Any, message: mqtt.MQTTMessage) -> None:
        if not seen:  # the first message of the first chunk: that read filled its chunk
            seen.append((client.unread_bytes_as_of_last_read(), client.unread_bytes()))
        deliver(c, u, message)

    client.on_message = on_message
    client.loop_stop()
    _publish_burst(local_broker)  # about twice a chunk, more than the socket holds
    deadline = time.monotonic() + 10
    while client.unread_bytes() < 66_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.unread_bytes() >= 66_000, "more than a chunk should be waiting in the socket"
    client.loop_start()
    assert done.wait(30), f"{len(received)} of {MESSAGES} delivered"
    as_of_read, fresh = seen[0]
    assert 60_000 < as_of_read <= fresh  # the rest of the chunk and what the kernel held; more may have come since
    # Nothing follows the burst: the last read was short, so it took everything the kernel held.
    assert client.unread_bytes_as_of_last_read() == 0
    client.disconnect()
    client.loop_stop()

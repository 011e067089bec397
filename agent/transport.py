"""MQTT 5 plumbing shared by every link the agent opens (paho-mqtt 2.x).

paho does not set TCP_NODELAY; without it each QoS 1 round trip on a quiet link waits on delayed ACKs
(~40 ms on loopback), so every client made here sets it as soon as its socket opens.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections import deque
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import CloudBroker, LocalBroker, TlsSettings


def _enable_tcp_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def new_client(client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """An MQTT 5 paho client with version-2 callbacks and TCP_NODELAY on its socket."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=manual_ack
    )
    client.on_socket_open = _enable_tcp_nodelay
    return client


def configure_broker_access(client: mqtt.Client, broker: LocalBroker | CloudBroker) -> None:
    """Credentials, TLS and reconnect backoff from a broker config section."""
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        tls = broker.tls if isinstance(broker.tls, TlsSettings) else TlsSettings()
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
            cert_reqs=ssl.CERT_NONE if tls.insecure_skip_verify else ssl.CERT_REQUIRED,
        )
        if tls.insecure_skip_verify:
            client.tls_insecure_set(True)
    client.reconnect_delay_set(min_delay=broker.reconnect_min_s, max_delay=broker.reconnect_max_s)  # type: ignore[arg-type]


def connect_properties(session_expiry: int, receive_maximum: int | None = None) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return props


def publish_properties(
    *,
    correlation_data: bytes | None = None,
    message_expiry: int | None = None,
    user_properties: list[tuple[str, str]] | None = None,
) -> Properties | None:
    if correlation_data is None and message_expiry is None and not user_properties:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if message_expiry is not None:
        props.MessageExpiryInterval = message_expiry
    if user_properties:
        props.UserProperty = user_properties
    return props


class AckSequencer:
    """Sends PUBACKs for received QoS 1 messages in arrival order, each only once it is marked done.

    MQTT 5 requires PUBACKs in the order the PUBLISHes arrived; the agent finishes requests out of order
    (several workers), so a finished request's acknowledgement waits for those that arrived before it.
    """

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self._generation = 0

    @property
    def generation(self) -> int:
        """Changes on every reconnect: message ids of an older connection must not be acknowledged."""
        return self._generation

    def received(self, mid: int) -> None:
        with self._lock:
            self._order.append(mid)

    def done(self, mid: int, generation: int) -> None:
        # Acknowledging under the lock keeps two finishing workers from interleaving their PUBACKs.
        with self._lock:
            if generation != self._generation:
                return
            self._done.add(mid)
            while self._order and self._order[0] in self._done:
                head = self._order.popleft()
                self._done.discard(head)
                self._client.ack(head, 1)

    def reset(self) -> None:
        """Forget pending acknowledgements; the broker redelivers those messages after reconnecting."""
        with self._lock:
            self._order.clear()
            self._done.clear()
            self._generation += 1

    def pending(self) -> int:
        with self._lock:
            return len(self._order)

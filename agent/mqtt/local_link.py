"""The local MQTT link: the paho client to the device's broker, where a request **arrives** and its reply
is **sent**.

It owns the client, its network thread (paho's ``loop_start``), connection and subscription, the check
that a message is a request at all, publishing, and the acknowledgements: a request's PUBACK goes out only
after the broker acknowledged its reply, in the order the requests arrived
(:class:`~agent.mqtt.transport.AckSequencer`). What to do with a request is the
:class:`~agent.exchange.RequestSink`'s business; this module knows nothing of JSON-RPC.

The broker is held to the CONNECT's Maximum Packet Size and to the packet identifiers of the requests it sent
and we have not acknowledged yet (tracked until their PUBACK is queued) by
:class:`~agent.mqtt.inbound_guard.InboundGuard`, and with ``[local] enforce_receive_maximum`` to its Receive
Maximum; one that breaks them is cut off, counted (``local_peer_violation``), logged, and reconnected to with
paho's backoff.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import LocalBroker
from agent.errors import AgentError
from agent.exchange import InboundRequest, OutgoingReply, RequestSink
from agent.faults import HEARTBEATS, INTERNAL_ERRORS
from agent.mqtt import topics
from agent.mqtt.inbound_guard import InboundLimits
from agent.mqtt.transport import (
    AckSequencer,
    configure_broker_access,
    connect_properties,
    new_guarded_client,
    publish_properties,
)

log = logging.getLogger(__name__)
# Replies published at QoS 1 and not yet acknowledged by the broker; paho holds further ones until PUBACKs
# arrive. Independent of the Receive Maximum the agent announces, which governs the other direction.
_REPLIES_IN_FLIGHT = 256


# Not frozen: a frozen dataclass sets each field through object.__setattr__, ~0.4 us more per reply.
@dataclass(slots=True)
class _PendingAck:
    """A request to acknowledge once the broker acknowledged the reply published for it."""

    mid: int
    qos: int
    generation: int


class LocalLink:
    """The agent's connection to its local broker; ``start()``, then ``close()``.

    ``on_connected`` runs on the network thread after every CONNACK (the app republishes its retained
    identity and status there). ``count`` records named events.
    """

    def __init__(
        self,
        broker: LocalBroker,
        device_id: str,
        *,
        receive_maximum: int,
        max_packet_bytes: int,
        on_connected: Callable[[], None],
        count: Callable[[str], None],
    ) -> None:
        self.device_id = device_id
        self._broker = broker
        self._receive_maximum = receive_maximum
        self._max_packet_bytes = max_packet_bytes
        self._on_connected = on_connected
        self._count = count
        self._sink: RequestSink | None = None
        self._accepting = threading.Event()
        self._subscribed = threading.Event()
        self._closing = threading.Event()
        self._publish_lock = threading.Lock()
        self._awaiting_puback: dict[int, _PendingAck | None] = {}
        self._early_pubacks: set[int] = set()
        self._idle = threading.Condition()
        # The local broker is input too: one that ignores the limits announced in CONNECT is cut off (before
        # paho reads the packet that breaks them) and reconnected to with the usual backoff.
        limits = InboundLimits(
            max_packet_bytes, receive_maximum, qos1_in_receive_maximum=broker.enforce_receive_maximum
        )
        self.client = new_guarded_client(f"edge-agent-{device_id}", limits, manual_ack=True, lean=True)
        self._acks = AckSequencer(self.client)
        configure_broker_access(self.client, broker)
        self.client.max_inflight_messages_set(_REPLIES_IN_FLIGHT)
        self.client.max_queued_messages_set(0)
        # paho lets a callback's exception end its network thread (or logs and drops it, depending on
        # suppress_exceptions): either way the agent would go deaf or leak a request. Each is guarded.
        self.client.on_connect = INTERNAL_ERRORS.wrap("local_connect", self._on_connect)
        self.client.on_disconnect = INTERNAL_ERRORS.wrap("local_disconnect", self._on_disconnect)
        self.client.on_subscribe = INTERNAL_ERRORS.wrap("local_subscribe", self._on_subscribe)
        self.client.on_message = INTERNAL_ERRORS.wrap("local_message", self._on_message)
        self.client.on_publish = INTERNAL_ERRORS.wrap("local_publish", self._on_publish)

    # ---- lifecycle (main thread) ------------------------------------------------------------------

    def set_will(self, topic: str, payload: bytes) -> None:
        """The message the broker publishes if the agent disappears without closing the link."""
        self.client.will_set(topic, payload, qos=1, retain=True)

    def start(self, sink: RequestSink, ready_timeout: float) -> None:
        """Connect, subscribe to the device's request topics and hand every request to ``sink``."""
        self._sink = sink
        self._accepting.set()
        broker = self._broker
        self.client.connect_async(
            broker.host,
            broker.port,
            keepalive=broker.keepalive,
            clean_start=False,
            properties=connect_properties(broker.session_expiry, self._receive_maximum, self._max_packet_bytes),
        )
        self.client.loop_start()
        if not self._subscribed.wait(ready_timeout):
            raise AgentError(
                f"could not subscribe on the local broker {broker.host}:{broker.port} within {ready_timeout:.0f} s"
            )

    def stop_accepting(self) -> None:
        """Leave new arrivals unacknowledged: the broker keeps them in the session and redelivers them later.

        No UNSUBSCRIBE: that would delete the subscription from the persistent session, and requests sent
        while the agent is down would be lost.
        """
        self._accepting.clear()

    def wait_published(self, deadline: float) -> None:
        """Wait (until the monotonic ``deadline``) for the broker to acknowledge every tracked publish."""
        with self._idle:
            while self._awaiting_puback and time.monotonic() < deadline:
                self._idle.wait(0.05)

    def close(self, final_status: tuple[str, bytes] | None = None) -> None:
        """Publish ``final_status`` (topic, payload; retained) if connected, then disconnect and stop the thread."""
        self._closing.set()
        if final_status is not None and self.client.is_connected():
            info = self.client.publish(final_status[0], final_status[1], qos=1, retain=True)
            info.wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()

    def is_connected(self) -> bool:
        return self.client.is_connected()

    def network_thread_alive(self) -> bool:
        """Whether paho's network thread is still running (a dead one leaves the agent deaf)."""
        network = getattr(self.client, "_thread", None)
        return network is not None and network.is_alive()

    def unread_bytes(self) -> int:
        """Request bytes the broker has sent that the network thread has not read yet, as of its last read
        (asked for every request served inline: no system call each time)."""
        return self.client.unread_bytes_as_of_last_read()

    def pending_acknowledgements(self) -> int:
        return self._acks.pending()

    # ---- publishing (any thread) --------------------------------------------------------------------

    def publish_reply(self, reply: OutgoingReply) -> bool:
        """Publish a reply at QoS 1; its request is acknowledged on the reply's PUBACK (or now, if refused)."""
        inbound = reply.inbound
        pending = (
            _PendingAck(inbound.mid, inbound.qos, inbound.generation) if inbound.qos > 0 and reply.acknowledges else None
        )
        props = publish_properties(correlation_data=reply.correlation_data)
        if not self._publish_tracked(reply.topic, reply.payload, pending, properties=props):
            if reply.acknowledges:
                self.acknowledge(inbound)
            return False
        return True

    def publishing_together(self) -> contextlib.AbstractContextManager[None]:
        """A block in which this thread's replies wake the network thread once, at its end (many replies
        published at once, e.g. after an outbox commit)."""
        return self.client.publishing_together()

    def publish_retained(self, topic: str, payload: bytes) -> bool:
        """Publish a retained QoS 1 message (status, identity); paho sends it once connected."""
        return self._publish_tracked(topic, payload, None, retain=True)

    def acknowledge(self, inbound: InboundRequest) -> None:
        """Mark a request done; its PUBACK goes out once every request that arrived before it is done too."""
        self._finish(inbound.mid, inbound.qos, inbound.generation)

    def _publish_tracked(
        self, topic: str, payload: bytes, pending: _PendingAck | None, *, retain: bool = False, properties: Any = None
    ) -> bool:
        """Publish at QoS 1; ``pending`` (a request to acknowledge) is finished when the broker's PUBACK arrives.

        Every QoS 1 publish goes through here so that each PUBACK finds its message id registered, even when
        it arrives before ``publish()`` has returned.
        """
        try:
            info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        except ValueError as exc:  # a topic paho will not publish to; callers validate, this is the backstop
            log.error("could not publish to %r: %s", topic, exc)
            self._count("publish_refused")
            return False
        except Exception as exc:  # not sent: the caller acknowledges its request now rather than never
            INTERNAL_ERRORS.record("reply", exc)
            return False
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("could not publish to %s: %s", topic, mqtt.error_string(info.rc))
            return False
        with self._publish_lock:
            acknowledged_already = info.mid in self._early_pubacks
            if acknowledged_already:
                self._early_pubacks.discard(info.mid)
            else:
                self._awaiting_puback[info.mid] = pending
        if acknowledged_already and pending is not None:
            self._finish(pending.mid, pending.qos, pending.generation)
        return True

    def _finish(self, mid: int, qos: int, generation: int) -> None:
        if qos > 0:
            self._acks.done(mid, generation)

    # ---- paho callbacks (network thread) ------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("local broker refused the connection: %s", reason)
            return
        log.info("connected to local broker (session present: %s)", flags.session_present)
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        client.subscribe(topics.request_filter(self.device_id), options=options)
        self._on_connected()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if any(reason.is_failure for reason in reasons):
            log.error("subscription refused by the local broker: %s", reasons)
            return
        self._subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._acks.reset()
        violation = self.client.inbound.violation  # cleared when paho reconnects, after this callback
        if violation is not None:
            self._count("local_peer_violation")
            log.error("cut off the local broker: %s; reconnecting", violation)
        elif not self._closing.is_set():
            log.warning("disconnected from local broker (%s); reconnecting", reason)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # paho calls this holding its outgoing-message lock, so nothing here may wait on a thread that is
        # inside client.publish(); _publish_lock is therefore never held across a paho call.
        with self._publish_lock:
            if mid in self._awaiting_puback:
                pending = self._awaiting_puback.pop(mid)
            else:
                self._early_pubacks.add(mid)
                pending = None
        if pending is not None:
            self._finish(pending.mid, pending.qos, pending.generation)
        with self._idle:
            self._idle.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """Hand a request to the sink, which from then on answers and acknowledges it exactly once.

        An unexpected exception before the hand-off acknowledges the message here (no answer: the link
        does not speak JSON-RPC); one from the sink itself is only recorded, because the sink already
        owns the acknowledgement and a second one would corrupt the PUBACK order.
        """
        with HEARTBEATS.busy("mqtt-network"):
            generation = self._acks.generation
            if message.qos > 0:
                self._acks.received(message.mid, message.qos)
            try:
                inbound = self._inbound(message, generation)
            except Exception as exc:
                INTERNAL_ERRORS.record("local_message", exc)
                self._finish(message.mid, message.qos, generation)
                return
            if inbound is None or self._sink is None:
                return
            with INTERNAL_ERRORS.guard("local_message"):
                self._sink.submit(inbound)

    def _inbound(self, message: mqtt.MQTTMessage, generation: int) -> InboundRequest | None:
        """The request ``message`` carries, or None when it is none of the sink's business (settled here)."""
        try:
            topic: str | None = message.topic
        except UnicodeDecodeError:  # paho hands on a topic that is not UTF-8 and raises when it is read
            topic = None
        client_id = topics.client_id_from_request_topic(topic, self.device_id) if topic is not None else None
        if client_id is None:
            self._count("ignored_topic")
            self._finish(message.mid, message.qos, generation)
            return None
        if not self._accepting.is_set() or self._sink is None:
            return None  # not acknowledged: redelivered from the session after a restart
        props = message.properties
        now = time.monotonic()
        expiry = getattr(props, "MessageExpiryInterval", None)
        return InboundRequest(
            client_id=client_id,
            payload=message.payload,
            mid=message.mid,
            qos=message.qos,
            generation=generation,
            received=now,
            expires=now + expiry if expiry is not None else None,
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
        )

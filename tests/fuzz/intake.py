"""The local intake as paho delivers it: real ``MQTTMessage`` objects into the real ``LocalLink._on_message``,
through a real Dispatcher, Admission and RequestPipeline, in each admission state.

The paho client is never connected. Two of its methods are observed, not replaced in effect: ``ack`` is
recorded instead of queueing a PUBACK for a socket that does not exist, and ``publish`` (the real one) has
its message ids recorded so that the harness can play the broker and acknowledge each reply, as the broker's
PUBACK would. Invariants: no exception escapes ``_on_message``, and none is caught by the agent's own guards
either (``edge_agent_internal_errors_total`` unchanged: the guards keep the threads alive, so an exception
they catch would otherwise pass unseen, and each is a bug); every QoS 1 request on a request topic is
acknowledged exactly once (none while stopping: those stay in the session for redelivery); QoS 0 never;
nothing stays pending in the link or the dispatcher; per-client rate state stays within ``max_clients``, and
the fair intake (its per-client queues) within its request and byte bounds while the workers are held back.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.app import Agent
from agent.config_loader import load_settings
from agent.faults import INTERNAL_ERRORS
from agent.models.devmodels import copy_bundled_models
from agent.observe.memory import MemoryWatchdog
from agent.serving.admission import Admission
from agent.serving.dispatcher import Dispatcher
from agent.serving.pipeline import RequestPipeline
from agent.signing import create_signer
from tests.fuzz.fuzzed import FuzzedInput

DEVICE = "dev1"
# "bytes_full": the fair intake full by bytes, shedding from the heaviest client; "deadline": every request
# behind the blocker expected to wait past its deadline, so refused at once (-32008); "backlog": the broker
# has sent more than the network thread has read, so nothing is served inline (it reads ahead instead).
STATES = (
    "idle", "busy", "rate_limited", "overloaded", "bytes_full", "deadline", "shedding", "stopping", "backlog",
)  # fmt: skip
MAX_MESSAGES = 12
MAX_CLIENTS = 4
DRAIN_S = 30.0  # a hang, not a slow request: the slowest bundled model runs in milliseconds
# Not inline-servable (its method lies beyond the head the dispatcher probes), so it waits in the queue
# until the workers start: the "busy", "overloaded", "bytes_full" and "deadline" states hold it there.
_BLOCKER = b'{"jsonrpc":"2.0","id":"blocker",' + b" " * 1100 + b'"method":"ping"}'
_CLIENTS = ("alice", "bob", "carol", "dave", "eve", "mallory")
_SAMPLE_TOPICS = (
    f"mcp/req/{DEVICE}/alice",
    f"mcp/req/{DEVICE}/",
    f"mcp/req/{DEVICE}/+",
    f"mcp/req/{DEVICE}/a/b",
    "mcp/req/other/alice",
    "mcp/res/dev1/alice",
)
_SAMPLE_PAYLOADS = (
    b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
    b'{"jsonrpc":"2.0","method":"ping"}',
    b'{"jsonrpc":"2.0","id":2,"method":"infer","params":{"model":"vibration-anomaly","inputs":{"features":'
    b"[[0.2,0.62,3.1,3.0,0.5,0.35,0.15,41.0]]}}}",
    b'{"jsonrpc":"2.0","id":3,"method":"models/list"}',
    b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"sensor-state","arguments":{}}}',
)


@dataclass
class _Observed:
    """What the harness saw of the paho client: PUBACKs sent and QoS 1 publishes awaiting the broker."""

    acks: list[int] = field(default_factory=list)
    published: list[int] = field(default_factory=list)


class IntakeRig:
    """One agent's components for one admission state, reused across inputs."""

    def __init__(self, state: str, root: Path, models_dir: Path) -> None:
        self.state = state
        overrides: dict[str, Any] = {
            "device_id": DEVICE,
            "models_dir": str(models_dir),
            "data_dir": str(root / state),
            "local": {"host": "127.0.0.1", "port": 1},
            "signing": {"backend": "software"},
            "rate_limit": {"enabled": False},
            "metrics": {"enabled": False},
            "models_poll_s": 0,
            "limits": {"process_memory_mb": 16384, "max_payload_bytes": 4096, "workers": 2},
        }
        if state == "rate_limited":
            overrides["rate_limit"] = {
                "enabled": True, "requests_per_s": 0.001, "burst": 1, "global_requests_per_s": 0.01,
                "max_clients": MAX_CLIENTS,
            }  # fmt: skip
        if state == "overloaded":
            overrides["limits"]["intake_queue"] = 1
        if state == "bytes_full":
            overrides["limits"]["intake_max_bytes"] = 65_536
        self.agent = Agent(load_settings(None, overrides))
        settings = self.agent.settings
        self.signer = create_signer(settings.signing, DEVICE, settings.data_dir)
        self.memory = self.agent.memory_watchdog
        if state == "shedding":
            # A real watchdog whose soft limit any process is above: one sample puts it into shedding.
            self.memory = MemoryWatchdog(1, relieve=lambda: None)
            self.memory.check()
        self.observed = _Observed()
        link = self.agent.link
        client = link.client
        real_publish = client.publish

        def publish(*args: Any, **kwargs: Any) -> mqtt.MQTTMessageInfo:
            info = real_publish(*args, **kwargs)
            self.observed.published.append(info.mid)
            return info

        client.publish = publish  # type: ignore[method-assign]
        client.ack = lambda mid, qos: self.observed.acks.append(mid)  # type: ignore[method-assign,assignment]

    def dispatcher(self) -> tuple[Dispatcher, Admission]:
        """A fresh admission and dispatcher (its own queue and workers), wired as ``Agent`` wires them."""
        agent, settings = self.agent, self.agent.settings
        pipeline = RequestPipeline(
            device_id=DEVICE, limits=settings.limits, service=agent.service, replies=agent.replies, signer=self.signer,
            upstream=None, fallback=None, audit=agent.audit, count=agent.count, observe=lambda **_: None,
        )  # fmt: skip
        admission = Admission(
            settings.limits, settings.rate_limit, self.memory, agent.audit, count=agent.count,
            count_rejection=lambda _: None,
        )  # fmt: skip
        dispatcher = Dispatcher(
            settings.limits, pipeline, admission, agent.link, runs_within=agent.models.runs_within,
            unread_bytes=(lambda: 1 << 30) if self.state == "backlog" else agent.link.unread_bytes,
            inline_allowed=True, count=agent.count, count_rejection=lambda _: None,
        )  # fmt: skip
        if self.state == "deadline":
            dispatcher.costs.default_s = 1000.0  # what nothing has been measured for is expected to take this long
        return dispatcher, admission


def _message(mid: int, topic: bytes, payload: bytes, qos: int, retain: bool, props: Properties | None) -> mqtt.MQTTMessage:
    message = mqtt.MQTTMessage(mid=mid, topic=topic)
    message.payload = payload
    message.qos = qos
    message.retain = retain
    message.properties = props
    return message


def _properties(data: FuzzedInput) -> Properties | None:
    """MQTT 5 PUBLISH properties as paho would decode them from the wire (any of them may be absent)."""
    present = data.byte()
    if not present & 0x80:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if present & 1:
        props.ResponseTopic = data.pick_text(
            [f"mcp/res/{DEVICE}/alice", f"mcp/res/{DEVICE}/alice/x", f"mcp/res/{DEVICE}/bob", "mcp/res/#"], 512
        )
    if present & 2:
        props.CorrelationData = data.chunk(512)
    if present & 4:
        props.UserProperty = [(data.text(64), data.text(4096)) for _ in range(data.byte() % 8)]
    if present & 8:
        props.MessageExpiryInterval = data.pick([0, 1, 3600, 2**32 - 1])
    return props


def _topic(data: FuzzedInput, client: str) -> bytes:
    kind = data.byte() % 8
    if kind < 5:
        return f"mcp/req/{DEVICE}/{client}".encode()
    if kind == 5:
        return data.pick(_SAMPLE_TOPICS).encode()
    return data.chunk(300)  # anything, invalid UTF-8 included: paho hands such topics on undecoded


def _payload(data: FuzzedInput) -> bytes:
    kind = data.byte() % 4
    if kind == 0:
        return data.pick(_SAMPLE_PAYLOADS)
    return data.chunk(8192)


RIGS: dict[str, IntakeRig] = {}


def _rigs() -> dict[str, IntakeRig]:
    if not RIGS:
        root = Path(tempfile.mkdtemp(prefix="fuzz-intake-"))
        models_dir = copy_bundled_models(root / "models")
        for state in STATES:
            RIGS[state] = IntakeRig(state, root, models_dir)
    return RIGS


def target_intake(data_bytes: bytes) -> None:
    """Deliver up to MAX_MESSAGES fuzzed PUBLISHes to one link in one admission state; check every ack."""
    data = FuzzedInput(data_bytes)
    rig = _rigs()[data.pick(STATES)]
    link = rig.agent.link
    dispatcher, admission = rig.dispatcher()
    rig.observed.acks.clear()
    rig.observed.published.clear()
    # What LocalLink.start() sets, without connecting.
    link._sink = dispatcher
    if rig.state == "stopping":
        link.stop_accepting()
    else:
        link._accepting.set()
    errors_before = INTERNAL_ERRORS.counts()
    try:
        expected = _deliver(rig, dispatcher, data)
        _settle(rig, dispatcher)
        errors = {where: n - errors_before[where] for where, n in INTERNAL_ERRORS.counts().items()}
        errors = {where: n for where, n in errors.items() if n}
        # Replayed under pytest (tests/test_fuzz_corpus.py), the log shows their tracebacks.
        assert not errors, f"exceptions caught by the agent's guards: {errors}"
        acked = {m: rig.observed.acks.count(m) for m in set(rig.observed.acks) | set(expected)}
        wrong = {m: (acked.get(m, 0), set(want)) for m, want in expected.items() if acked.get(m, 0) not in want}
        unexpected = {m: n for m, n in acked.items() if m not in expected and n}
        assert not wrong and not unexpected, f"acknowledgements (got, wanted) {wrong}, unexpected {unexpected}"
        assert dispatcher.queue_depth() == 0
        assert not link._awaiting_puback and not link._early_pubacks, "publishes left awaiting a PUBACK"
        if rig.state != "stopping":
            assert link.pending_acknowledgements() == 0, "acknowledgements left pending"
        assert admission._rates.tracked_clients <= admission._rates.max_clients
        assert admission._answered_refusals.tracked_clients <= admission._answered_refusals.max_clients
    finally:
        dispatcher.stop()
        # A reconnect, as paho reports it: pending acknowledgements of this "connection" are forgotten.
        link._on_disconnect(link.client, None, None, ReasonCode(PacketTypes.DISCONNECT), None)
        link.client.drop_out_messages()


def _deliver(rig: IntakeRig, dispatcher: Dispatcher, data: FuzzedInput) -> dict[int, frozenset[int]]:
    """Hand the fuzzed PUBLISHes to the link; returns how often each QoS 1 message may be acknowledged."""
    link = rig.agent.link
    deferred_workers = rig.state in ("busy", "overloaded", "bytes_full", "deadline")
    if not deferred_workers:
        dispatcher.start()
    expected: dict[int, frozenset[int]] = {}
    mid = 1
    if deferred_workers:
        link._on_message(link.client, None, _message(mid, f"mcp/req/{DEVICE}/blocker".encode(), _BLOCKER, 1, False, None))
        expected[mid] = _ONCE
        mid += 1
    for _ in range(1 + data.byte() % MAX_MESSAGES):
        client = data.pick(_CLIENTS)
        topic = _topic(data, client)
        qos = data.byte() % 2  # the subscription is QoS 1: the broker never delivers QoS 2 to it
        retain = data.flag()
        props = _properties(data)
        payload = _payload(data)
        if qos == 1:
            expected[mid] = _expected_acks(rig.state, topic)
        # paho delivers QoS 0 with mid 0
        link._on_message(link.client, None, _message(mid if qos else 0, topic, payload, qos, retain, props))
        mid += 1
    if deferred_workers:  # the intake at its fullest: every request of this input waits in it
        intake = dispatcher._intake.figures()
        limits = rig.agent.settings.limits
        assert intake.requests <= limits.intake_queue and intake.clients <= limits.intake_queue, intake
        assert intake.bytes <= limits.intake_max_bytes, intake
        dispatcher.start()
    return expected


_ONCE = frozenset({1})


def _expected_acks(state: str, topic: bytes) -> frozenset[int]:
    """How often a QoS 1 message may be acknowledged.

    Once, except while stopping: requests are then left for redelivery, and a message on a topic that is
    not a request, though finished at once, waits behind them (PUBACKs go out in arrival order).
    """
    if state != "stopping":
        return _ONCE
    return frozenset({0}) if _is_request_topic(topic) else frozenset({0, 1})


def _is_request_topic(topic: bytes) -> bool:
    try:
        text = topic.decode("utf-8")
    except UnicodeDecodeError:
        return False
    prefix = f"mcp/req/{DEVICE}/"
    client = text[len(prefix) :]
    return text.startswith(prefix) and bool(client) and not any(ch in client for ch in "+#/\x00")


def _settle(rig: IntakeRig, dispatcher: Dispatcher) -> None:
    """Wait for the dispatcher to finish, playing the broker: every reply publish gets its PUBACK."""
    link = rig.agent.link
    deadline = time.monotonic() + DRAIN_S
    while True:
        dispatcher.drain(min(deadline, time.monotonic() + 0.01))
        while rig.observed.published:
            link._on_publish(link.client, None, rig.observed.published.pop(0), ReasonCode(PacketTypes.PUBACK), None)
        if dispatcher.queue_depth() == 0 and link.pending_acknowledgements() == 0 or rig.state == "stopping":
            dispatcher.drain(deadline)
            if not rig.observed.published:
                break
        assert time.monotonic() < deadline, "hang: requests still in flight after the drain deadline"

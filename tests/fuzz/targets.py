"""One ``target_<name>(data: bytes) -> None`` per surface that reads bytes from outside the agent.

Each target decodes its input with :class:`~tests.fuzz.fuzzed.FuzzedInput` (no atheris needed, so the
committed corpus replays anywhere), drives real agent code and asserts its invariants: no exception escapes
but the documented one, and what the surface promises about bounds. An AssertionError or any other exception
is a finding. Heavy fixtures (model folders, outboxes) are built once per process and reused.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from paho.mqtt import _packet as mqtt_packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import CloudBroker, Limits, OutboxSettings
from agent.config_loader import load_settings_with_sources
from agent.deploy.trust import SignedClock, Trust, load_public_key
from agent.errors import AgentError, DeployError, InvalidParams, PeerViolation, RequestError
from agent.exchange import InboundRequest
from agent.models.catalog import build_catalog, load_manifest
from agent.models.devmodels import copy_bundled_models
from agent.models.images import image_tensor
from agent.models.inference import TensorInfo, prepare_input
from agent.models.manager import ModelManager
from agent.models.taskspec import Preprocess
from agent.mqtt.inbound_guard import InboundGuard, InboundLimits
from agent.serving.fallback import CloudFallback
from agent.serving.protocol import (
    InferParams,
    Request,
    check_shape,
    estimated_elements,
    nesting_depth,
    parse_request,
    probe_request_id,
)
from agent.serving.service import RequestService, Timing
from agent.signing.outgoing import encode_reply
from agent.upstream.outbox import Outbox
from agent.upstream.uplink import CloudMessage, Uplink
from agent.upstream.uplink_batch import Publication
from tests.fixtures.deploy_bundles import MemoryStore, fixed_publisher
from tests.fuzz.fuzzed import FuzzedInput
from tests.fuzz.intake import target_intake
from tests.fuzz.local_packets import target_local_packets
from tests.fuzz.model_file import target_model_file
from tests.fuzz.probe_state import target_probe_state


# The outboxes here live in memory (/dev/shm), up to 256 of them: a disk reserve each would hold 1 GiB.
_NO_RESERVE = OutboxSettings(reserve_bytes=0)


@cache
def _workdir() -> Path:
    # On tmpfs where there is one: the outbox fsyncs every transaction, which on a disk caps a target at ~100 runs/s.
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="fuzz-", dir=shm if shm.is_dir() else None))


@cache
def _models_dir() -> Path:
    return copy_bundled_models(_workdir() / "models")


# ---- JSON-RPC parsing and shape pre-checks ------------------------------------------------------------


def target_protocol(data_bytes: bytes) -> None:
    """parse_request raises only RequestError; the pre-checks and the id probe never raise."""
    data = FuzzedInput(data_bytes)
    max_depth = 1 + data.byte() % 40
    max_values = data.pick([None, 1, 16, 1024, 1_000_000])
    payload = data.rest()
    assert nesting_depth(payload) >= 0
    assert estimated_elements(payload) >= 1
    request_id = probe_request_id(payload)
    assert request_id is None or (isinstance(request_id, (str, int)) and not isinstance(request_id, bool))
    try:
        check_shape(payload, max_depth=max_depth, max_values=max_values)
    except RequestError:
        pass
    try:
        request = parse_request(payload, max_depth=max_depth, max_values=max_values)
    except RequestError:
        return
    assert isinstance(request, Request)
    # Whatever parsed must be answerable: its id goes into a reply that is encoded for publishing.
    encode_reply({"jsonrpc": "2.0", "id": request.id, "result": {"params": request.params}}, None, client_id="c",
                 request_sha256="0" * 64)  # fmt: skip


# ---- tensor inputs: nested lists and b64 tensors ------------------------------------------------------

_DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")


def target_tensor(data_bytes: bytes) -> None:
    """prepare_input raises only InvalidParams and returns exactly the tensor's shape and dtype."""
    data = FuzzedInput(data_bytes)
    dtype = np.dtype(data.pick(_DTYPES))
    shape = tuple(data.byte() % 9 for _ in range(data.byte() % 4))
    quantized = data.flag() and dtype.kind in "iu"
    info = TensorInfo("x", 0, shape, dtype, scale=data.pick([0.5, 1e-30, 3.9e38]) if quantized else 0.0,
                      zero_point=data.pick([0, -128, 127]))  # fmt: skip
    raw, max_elements = data.flag(), data.pick([1, 64, 1_000_000])
    try:
        value = json.loads(data.rest())
    except (ValueError, RecursionError):
        return
    if not isinstance(value, (list, dict)):
        return
    try:
        array = prepare_input(info, value, raw=raw, max_elements=max_elements)
    except RequestError:
        return
    assert array.shape == shape and array.dtype == dtype, (array.shape, array.dtype)


# ---- image inputs -------------------------------------------------------------------------------------

_PREPROCESS_VARIANTS = tuple(
    Preprocess(resize=resize, color=color) for resize in ("stretch", "letterbox", "crop") for color in ("rgb", "bgr", "grayscale")
)


def target_image(data_bytes: bytes) -> None:
    """A client's picture (``params.image.b64``): the input tensor of exactly the input's shape and dtype, or
    InvalidParams; never another exception, never more pixels decoded than allowed."""
    data = FuzzedInput(data_bytes)
    spec = data.pick(_PREPROCESS_VARIANTS)
    channels = 1 if spec.color == "grayscale" else 3
    dtype = np.dtype(data.pick(["float32", "uint8", "int8"]))
    info = TensorInfo("image", 0, (1, 1 + data.byte() % 16, 1 + data.byte() % 16, channels), dtype, 0.0, 0)
    try:
        tensor, _ = image_tensor(info, spec, base64.b64encode(data.rest()).decode(), max_pixels=4096)
    except InvalidParams:
        return
    assert tensor.shape == info.shape and tensor.dtype == dtype, (tensor.shape, tensor.dtype)


# ---- tools/call arguments -----------------------------------------------------------------------------


@cache
def _service() -> RequestService:
    limits = Limits(process_memory_mb=16384, max_input_elements=100_000)
    return RequestService(ModelManager.for_limits(_models_dir(), limits), limits, device_id="dev1", profile="fuzz")


def target_tools_call(data_bytes: bytes) -> None:
    """tools/call with any params: a result, or a RequestError; the result encodes for publishing."""
    data = FuzzedInput(data_bytes)
    name = data.pick_text(["vibration-anomaly", "sensor-state", "nope"], 64)
    try:
        params = json.loads(data.rest())
    except (ValueError, RecursionError):
        return
    if isinstance(params, dict) and "name" not in params:
        params = {"name": name, "arguments": params}
    request = Request(jsonrpc="2.0", method="tools/call", params=params if isinstance(params, (dict, list)) else None, id=1)
    try:
        result = _service().handle(request, Timing(received=0.0, started=0.0))
    except RequestError:
        return
    assert isinstance(result.get("isError"), bool)
    encode_reply({"jsonrpc": "2.0", "id": 1, "result": result}, None, client_id="c", request_sha256="0" * 64)


# ---- from the cloud: fallback answers and PUBACK reason codes ----------------------------------------


class _FallbackRig:
    """A CloudFallback that forwards with the msg-ids queued in ``msg_ids`` and relays into ``relayed``."""

    def __init__(self) -> None:
        self.msg_ids: list[str] = []
        self.relayed: list[dict[str, Any]] = []
        self.fallback = CloudFallback(
            ["big"], enqueue=lambda body, ttl_s: self.msg_ids.pop(0), relay=lambda _, reply: self.relayed.append(reply),
            count=lambda _: None,
        )  # fmt: skip

    def forward(self, msg_id: str) -> None:
        self.msg_ids.append(msg_id)
        request = Request(jsonrpc="2.0", method="infer", params={"model": "big", "inputs": {}}, id=msg_id)
        # An hour: no deadline expires (and relays a timeout from the expiry thread) during one input.
        self.fallback.forward(
            "c", request, InferParams(model="big", inputs={}, timeout_ms=3_600_000), context=None, held_bytes=0
        )


def target_cloud_answer(data_bytes: bytes) -> None:
    """An answer on mcp/cloud/res/{device}: never raises; a relayed answer is encodable; at most one relayed."""
    data = FuzzedInput(data_bytes)
    # A fresh fallback per input: a settled request's deadline stays in the heap until it falls due, so one
    # fallback kept across millions of inputs would grow by two entries each.
    rig = _FallbackRig()
    try:
        pending_ids = ["m-1", "m-2"]
        for msg_id in pending_ids:
            rig.forward(msg_id)
        user_properties = {data.text(32): data.text(256) for _ in range(data.byte() % 4)}
        if data.flag():
            user_properties["msg-id"] = data.pick_text(pending_ids, 64)
        message = CloudMessage(topic="mcp/cloud/res/dev1", payload=data.rest(), user_properties=user_properties)
        rig.fallback.on_cloud_message(message)
        for reply in rig.relayed:
            encode_reply(reply, None, client_id="c", request_sha256="0" * 64)
        assert len(rig.relayed) <= 1
    finally:
        rig.fallback.stop()


@cache
def _uplink() -> tuple[Outbox, Uplink]:
    outbox = Outbox(_workdir() / "puback.db", _NO_RESERVE)
    cloud = CloudBroker(host="127.0.0.1", port=1, tls=False)
    return outbox, Uplink(outbox, cloud, "dev1")


def target_cloud_stream(data_bytes: bytes) -> None:
    """The bytes a broker sends, as the uplink (or, counting QoS 1 messages until acknowledged, the local link)
    reads them from its socket in pieces of any size: the inbound guard lets them through or refuses them with
    PeerViolation, the same whatever the pieces, and never leaves more messages held than the Receive Maximum
    it announced, also when the local link acknowledges between reads (a third run: after every piece whose
    first byte is odd, the lowest identifier held)."""
    data = FuzzedInput(data_bytes)
    max_packet_bytes = 2 + data.uint(2)
    receive_byte = data.byte()
    # The high bit of the Receive Maximum's byte picks the local link's guard, the next one whether it holds QoS 1
    # messages to Receive Maximum too, so the corpus of the cloud's guard (found before QoS 1 was counted) keeps
    # its meaning when the high bit is clear.
    count_qos1 = receive_byte >= 128
    limits = InboundLimits(max_packet_bytes, 1 + receive_byte % 16, qos1_in_receive_maximum=bool(receive_byte & 64))
    piece = 1 + data.byte()
    stream = data.rest()
    outcomes = []
    for size, acknowledging in ((piece, False), (len(stream) or 1, False), (piece, count_qos1)):
        guard = InboundGuard(limits, count_qos1=count_qos1)
        refused = None
        try:
            for start in range(0, len(stream), size):
                guard.feed(stream[start : start + size])
                if acknowledging and stream[start] & 1 and guard.awaiting_ack:
                    guard.acknowledged(min(guard.awaiting_ack))
        except PeerViolation as exc:
            refused = str(exc)
        held = len(guard.awaiting_release) + (len(guard.awaiting_ack) if limits.qos1_in_receive_maximum else 0)
        assert held <= limits.receive_maximum, (guard.awaiting_release, guard.awaiting_ack)
        assert count_qos1 or not guard.awaiting_ack, guard.awaiting_ack
        outcomes.append((refused, guard.awaiting_release, guard.awaiting_ack))
    assert outcomes[0] == outcomes[1], outcomes


def target_puback(data_bytes: bytes) -> None:
    """A PUBACK as the cloud broker sends it: a reason below 0x80 deletes the rows, any other dead-letters them."""
    data = FuzzedInput(data_bytes)
    outbox, uplink = _uplink()
    outbox.enqueue("telemetry", b'{"n":1}')
    (record,) = outbox.claim_batch(1)
    mid = 1 + data.uint(2) % 65535
    packet = mid.to_bytes(2, "big") + data.rest()
    try:
        puback = mqtt_packet.decode_puback(0x40, packet, MQTTProtocolVersion.MQTTv5)
    except mqtt_packet.MalformedPacket:
        # paho drops the connection on a malformed packet; the uplink gives the row back, as here.
        outbox.release_claims([record.id])
        _settle_one(outbox)
        return
    # The uplink's own bookkeeping, as _publish_handed_over leaves it for a publish awaiting its PUBACK.
    uplink._window.inflight[puback.mid] = Publication("mcp/up/dev1/telemetry", b"", Properties(PacketTypes.PUBLISH), (record.id,), False)
    uplink._on_publish(uplink._client, None, puback.mid, puback.reason, puback.properties)
    uplink._drain._record_acks()
    remaining = {entry.id: entry.state for entry in outbox.peek(10)}
    if puback.reason.value < 0x80:
        assert record.id not in remaining, remaining
    else:
        assert remaining.get(record.id) == "dead", remaining
        outbox.retry_dead([record.id])
        _settle_one(outbox)
    assert not outbox.peek(10), "rows left behind"


def _settle_one(outbox: Outbox) -> None:
    """Deliver the one row waiting, so that the next input starts from an empty outbox."""
    (record,) = outbox.claim_batch(1)
    outbox.mark_delivered([record.id])


@cache
def _deploy_publisher() -> Any:
    return fixed_publisher()


def target_deploy_document(data_bytes: bytes) -> None:
    """A retained message on a deployment topic: a deployment document (with the bundle manifest it carries) or a
    key list. Verified with the fleet's real keys, or refused with a DeployError; nothing else escapes."""
    data = FuzzedInput(data_bytes)
    kind = data.pick(("deployment", "key_list"))
    store = MemoryStore()
    publisher = _deploy_publisher()
    trust = Trust(
        [load_public_key(publisher.release_pem)], load_public_key(publisher.root_pem), store,
        SignedClock(store, synchronised=lambda: False),
    )  # fmt: skip
    try:
        if kind == "deployment":
            document = trust.verify_deployment(data.rest())
            assert document.sequence >= 0
        else:
            trust.accept_key_list(data.rest())
            assert trust.key_list is not None
    except DeployError:
        return


# ---- files: the model manifest, config files and profiles, outbox rows -------------------------------


def target_manifest(data_bytes: bytes) -> None:
    """Any manifest.json: loaded, or refused with a ModelError (an AgentError); a catalog builds from it."""
    folder = _workdir() / "manifest"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_bytes(data_bytes)
    try:
        manifest = load_manifest(folder)
    except AgentError:
        return
    build_catalog(folder, manifest)


def target_config(data_bytes: bytes) -> None:
    """Any agent.toml and profile file: settings, or a ConfigError (an AgentError) naming the problem."""
    data = FuzzedInput(data_bytes)
    folder = _workdir() / "config"
    folder.mkdir(exist_ok=True)
    config, profile = folder / "agent.toml", folder / "board.toml"
    profile.write_bytes(data.chunk())
    config.write_bytes(data.rest())
    try:
        load_settings_with_sources(config, system_root=folder)
    except AgentError:
        return


_ROW_COLUMNS = ("msg_id", "cls", "body", "size", "enqueued_wall", "enqueued_clock", "expires_clock", "state",
                "attempts", "failures", "last_reason", "retry_clock")  # fmt: skip


_COLUMN_VALUES: tuple[Callable[[FuzzedInput], Any], ...] = (
    lambda data: None,
    lambda data: data.uint(8) - 2**63,
    lambda data: float(np.frombuffer(data.uint(8).to_bytes(8, "little"), dtype="<f8")[0]),
    lambda data: data.chunk(64).decode("utf-8", "replace"),  # sqlite3 refuses to store lone surrogates
    lambda data: data.chunk(256),
    lambda data: data.pick(["queued", "claimed", "dead", "telemetry", "res", "audit", "fallback", ""]),
    lambda data: data.uint(2),
)


def _column_value(data: FuzzedInput) -> Any:
    """Any SQLite value: NULL, an integer, a float (NaN and infinities too), text, a blob, a likely word."""
    return _COLUMN_VALUES[data.byte() % len(_COLUMN_VALUES)](data)


def target_outbox_rows(data_bytes: bytes) -> None:
    """Rows written to outbox.db by someone else (corruption, a tool): opened, counted, claimed, settled and
    new rows added, or refused with an OutboxError (an AgentError); nothing else escapes."""
    data = FuzzedInput(data_bytes)
    path = _workdir() / f"rows-{data.byte()}.db"
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink(missing_ok=True)  # SQLite may remove its -shm as the last connection closes
    Outbox(path, _NO_RESERVE).close()
    db = sqlite3.connect(path)
    try:
        for _ in range(1 + data.byte() % 4):
            values = [_column_value(data) for _ in _ROW_COLUMNS]
            try:
                db.execute(f"INSERT INTO outbox ({', '.join(_ROW_COLUMNS)}) VALUES ({', '.join('?' * len(values))})",
                           values)  # fmt: skip
            except sqlite3.IntegrityError:
                pass  # a NOT NULL column left NULL: SQLite itself refuses such a row
        db.commit()
    finally:
        db.close()
    try:
        outbox = Outbox(path, _NO_RESERVE)
    except AgentError:
        return  # refused as an OutboxError, never anything else
    try:
        _exercise_outbox(outbox)
    finally:
        outbox.close()


def _exercise_outbox(outbox: Outbox) -> None:
    try:
        outbox.stats()
        outbox.peek(20)
        claimed = outbox.claim_batch(20)
        outbox.mark_delivered([record.id for record in claimed[::2]])
        outbox.mark_failed_many([(record.id, 0x80) for record in claimed[1::2]])
        outbox.retry_dead()
        outbox.release_claims()
        # Bogus size columns no longer count (tests/test_fuzz_findings.py); a refusal is still an OutboxError.
        outbox.enqueue("telemetry", b'{"after":true}')
    except AgentError:
        return


TARGETS: dict[str, Callable[[bytes], None]] = {
    "intake": target_intake,
    "local_packets": target_local_packets,
    "protocol": target_protocol,
    "tensor": target_tensor,
    "image": target_image,
    "tools_call": target_tools_call,
    "cloud_answer": target_cloud_answer,
    "cloud_stream": target_cloud_stream,
    "puback": target_puback,
    "deploy_document": target_deploy_document,
    "manifest": target_manifest,
    "model_file": target_model_file,
    "probe_state": target_probe_state,
    "config": target_config,
    "outbox_rows": target_outbox_rows,
}

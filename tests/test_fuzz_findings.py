"""Regression tests for what the fuzzers (tests/fuzz/) found; each input is also in tests/fuzz/corpus/."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import tracemalloc
import zipfile
from collections import Counter
from pathlib import Path

import flatbuffers
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.config import LocalBroker
from agent.config_loader import load_settings
from agent.errors import ConfigError, InvalidParams, ModelError
from agent.models.catalog import load_manifest
from agent.models import metadata_schema
from agent.models.inference import TensorInfo, prepare_input
from agent.models.tflite_file import MAX_LABEL_BYTES, read_file_facts
from agent.mqtt.local_link import LocalLink
from agent.mqtt.transport import new_client
from agent.serving.fallback import CloudFallback
from agent.serving.protocol import nesting_depth
from agent.upstream.outbox import Outbox
from agent.upstream.uplink import CloudMessage
from tests.fixtures.generated_models import constant_classifier
from tests.fixtures.tflite_metadata import TensorMeta, metadata_flatbuffer, with_metadata

MODEL_FILE_CORPUS = Path(__file__).parent / "fuzz" / "corpus" / "model_file"


def test_a_request_topic_that_is_not_utf8_is_acknowledged_and_ignored() -> None:
    # paho hands such a topic on undecoded and raises when message.topic is read: that used to escape
    # on_message (paho's network thread) and leave the message's PUBACK blocking every later one.
    counts: Counter[str] = Counter()
    link = LocalLink(
        LocalBroker(), "dev1", receive_maximum=16, max_packet_bytes=1 << 20, on_connected=lambda: None,
        count=lambda name: counts.update([name]),
    )
    acks: list[int] = []
    link.client.ack = lambda mid, qos: acks.append(mid)  # type: ignore[method-assign,assignment]
    message = mqtt.MQTTMessage(mid=7, topic=b"mcp/req/dev1/\xc3\x28")
    message.qos = 1
    link._on_message(link.client, None, message)
    assert acks == [7]
    assert counts["ignored_topic"] == 1


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="agent.toml"):
        load_settings(config)


def test_a_profile_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "board.toml").write_bytes(b"\xff")
    config = tmp_path / "agent.toml"
    config.write_text('profile = "./board.toml"\n')
    with pytest.raises(ConfigError, match="board"):
        load_settings(config)


def test_a_profile_under_an_unknown_users_home_is_a_config_error(tmp_path: Path) -> None:
    # Found by `make fuzz` (config): pathlib's expanduser raises RuntimeError for "~nosuchuser/...".
    config = tmp_path / "agent.toml"
    config.write_text('profile = "~no-such-user-here/board.toml"\n')
    with pytest.raises(ConfigError, match="no home directory"):
        load_settings(config)


def test_a_deeply_nested_manifest_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_bytes(b"[" * 100_000)
    with pytest.raises(ModelError, match="invalid manifest"):
        load_manifest(tmp_path)


def test_a_deeply_nested_cloud_answer_is_counted_as_bad() -> None:
    counts: Counter[str] = Counter()
    fallback = CloudFallback(["big"], enqueue=lambda body, ttl: "m", relay=lambda c, r: None, count=lambda name: counts.update([name]))
    try:
        fallback.on_cloud_message(CloudMessage(topic="mcp/cloud/res/dev1", payload=b"[" * 100_000, user_properties={}))
    finally:
        fallback.stop()
    assert counts["fallback_bad_answer"] == 1


@pytest.mark.parametrize("shape", [[2**70], [2**62, 4, 0], [0] * 70])
def test_a_b64_tensor_shape_numpy_cannot_hold_is_invalid_params(shape: list[int]) -> None:
    info = TensorInfo("x", 0, (1,), np.dtype("int8"), scale=0.0, zero_point=0)
    with pytest.raises(InvalidParams, match="'x'"):
        prepare_input(info, json.loads(json.dumps({"b64": "", "dtype": "int8", "shape": shape})), raw=False, max_elements=10)


def test_a_b64_tensor_dtype_that_is_not_a_string_is_invalid_params() -> None:
    info = TensorInfo("x", 0, (1,), np.dtype("float32"), scale=0.0, zero_point=0)
    with pytest.raises(InvalidParams, match="dtype must be one of"):
        prepare_input(info, {"b64": "AAAAAA==", "dtype": [1]}, raw=False, max_elements=10)


@pytest.mark.parametrize("closing", [1, 64, 65, 1000])
def test_nesting_depth_of_a_text_that_only_closes_is_zero_however_long(closing: int) -> None:
    # Past 64 brackets the count runs in numpy; it used to report a negative depth where the loop says 0.
    assert nesting_depth(b"]" * closing) == 0


def _outbox_with_audit_rows_of_size(path: Path, *sizes: int) -> None:
    """An outbox file holding audit rows (dropped last under pressure) whose size column says ``sizes``."""
    Outbox(path).close()
    with sqlite3.connect(path) as db:
        for size in sizes:
            db.execute(
                "INSERT INTO outbox (msg_id, cls, body, size, enqueued_wall, enqueued_clock, state) "
                "VALUES ('m', 'audit', x'7b7d', ?, 0, 0, 'queued')",
                (size,),
            )
    db.close()


def test_a_row_whose_stored_size_is_bogus_does_not_fill_the_outbox(tmp_path: Path) -> None:
    # The accounting used to add the stored size column: 2**62 "bytes" of audit evicted every new message.
    _outbox_with_audit_rows_of_size(tmp_path / "outbox.db", 2**62)
    with Outbox(tmp_path / "outbox.db") as outbox:
        outbox.enqueue("telemetry", b"{}")
        stats = outbox.stats()
        assert stats.messages == 2 and stats.bytes == 4
        assert [entry.size for entry in outbox.peek()] == [2, 2]
        assert sum(outbox.stats().drops.get("capacity", {}).values()) == 0


def test_rows_whose_stored_sizes_overflow_their_sum_still_open(tmp_path: Path) -> None:
    # SUM() of two such sizes overflows in SQLite ("integer overflow"), which kept the outbox from opening.
    _outbox_with_audit_rows_of_size(tmp_path / "outbox.db", 2**63 - 1, 2**63 - 1)
    with Outbox(tmp_path / "outbox.db") as outbox:
        assert outbox.stats().bytes == 4
        assert [record.body for record in outbox.claim_batch(10)] == [b"{}", b"{}"]


def test_a_dead_row_whose_retry_time_is_text_does_not_stop_the_outbox_writer(tmp_path: Path) -> None:
    # SQLite keeps whatever type was written; the writer computed its idle wait from this value outside its
    # error handling, died, and left every later caller waiting on its future forever.
    path = tmp_path / "outbox.db"
    Outbox(path).close()
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO outbox (msg_id, cls, body, size, enqueued_wall, enqueued_clock, state, retry_clock) "
            "VALUES ('m', 'audit', x'7b7d', 2, 0, 0, 'dead', 'queued')"
        )
    db.close()
    outcome: list[object] = []
    with Outbox(path) as outbox:
        # A daemon thread and a generous join: a regression hangs, and must not hang the suite with it.
        caller = threading.Thread(target=lambda: outcome.append(outbox.stats()), daemon=True)
        caller.start()
        caller.join(60)
        assert outcome, "the outbox writer stopped answering"


@pytest.mark.parametrize("lean", [False, True], ids=["paho", "lean"])
def test_a_publish_with_both_qos_bits_set_is_a_protocol_error_and_reaches_no_callback(lean: bool) -> None:
    # Found by the local_packets harness: the local link's lean client took QoS 3 for a QoS 1 message, handed
    # it to on_message and kept the connection; paho refuses it (a protocol error: the connection is dropped).
    client = new_client("c", manual_ack=True, lean=lean)
    received: list[mqtt.MQTTMessage] = []
    client.on_message = lambda c, u, message: received.append(message)
    client._in_packet = {**client._in_packet, "command": 0x36, "packet": bytearray(b"\x00\x01a\x00\x07\x00x")}
    assert client._handle_publish() == mqtt.MQTT_ERR_PROTOCOL
    assert received == []


def test_a_label_file_cut_short_inside_the_packed_archive_is_a_model_error() -> None:
    # zipfile raised EOFError (not a BadZipFile) reading the member, and it escaped read_file_facts.
    content = (MODEL_FILE_CORPUS / "crash-ff131130661cf093073029b72f6e6687566f60af").read_bytes()
    with pytest.raises(ModelError, match="'labels.txt' packed in the model is damaged"):
        read_file_facts(content)


def test_a_packed_archive_zipfile_cannot_open_is_a_model_error() -> None:
    # An unknown "version needed to extract": zipfile raised NotImplementedError opening the archive.
    content = (MODEL_FILE_CORPUS / "crash-9019a564b295af7b9cb222ccfbbe244e28a303cd").read_bytes()
    with pytest.raises(ModelError, match="zip archive packed in the model is damaged"):
        read_file_facts(content)


def _labelled_model(archive: bytes) -> bytes:
    metadata = metadata_flatbuffer("toy", "", [], [TensorMeta("scores", label_file="labels.txt")])
    return with_metadata(constant_classifier([0.25, 0.75]), metadata) + archive


def test_a_label_file_that_inflates_past_the_cap_is_refused_without_inflating_it() -> None:
    # 64 MiB of newlines deflate to ~64 KB: every packed file used to be read whole, named or not.
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as packed:
        packed.writestr("labels.txt", b"\n" * (64 << 20))
    content = _labelled_model(archive.getvalue())
    tracemalloc.start()
    try:
        with pytest.raises(ModelError, match=f"more than {MAX_LABEL_BYTES} bytes"):
            read_file_facts(content)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MAX_LABEL_BYTES


def test_metadata_whose_offsets_all_point_at_one_tensor_is_refused() -> None:
    # 4,000 input entries naming one tensor with a 1,000-byte description: 4 MB of text from an 18 KB file.
    builder = flatbuffers.Builder(0)
    description = builder.CreateString("x" * 1000)
    metadata_schema.TensorMetadataStart(builder)
    metadata_schema.TensorMetadataAddDescription(builder, description)
    tensor = metadata_schema.TensorMetadataEnd(builder)
    metadata_schema.SubGraphMetadataStartInputTensorMetadataVector(builder, 4000)
    for _ in range(4000):
        builder.PrependUOffsetTRelative(tensor)
    inputs = builder.EndVector()
    metadata_schema.SubGraphMetadataStart(builder)
    metadata_schema.SubGraphMetadataAddInputTensorMetadata(builder, inputs)
    subgraph = metadata_schema.SubGraphMetadataEnd(builder)
    metadata_schema.ModelMetadataStartSubgraphMetadataVector(builder, 1)
    builder.PrependUOffsetTRelative(subgraph)
    subgraphs = builder.EndVector()
    metadata_schema.ModelMetadataStart(builder)
    metadata_schema.ModelMetadataAddSubgraphMetadata(builder, subgraphs)
    builder.Finish(metadata_schema.ModelMetadataEnd(builder), file_identifier=b"M001")
    content = with_metadata(constant_classifier([0.25, 0.75]), bytes(builder.Output()))
    with pytest.raises(ModelError, match="read more than the file holds"):
        read_file_facts(content)


def _pubrel_answer(command: int, body: bytes, *, lean: bool) -> bytes:
    """What a connected manual-ack client queues on reading a PUBREL for a message it does not hold."""
    client = new_client("c", manual_ack=True, lean=lean)
    client._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    client._thread = threading.current_thread()  # the network thread: what it sends waits in the queue
    client._in_packet = {**client._in_packet, "command": command, "packet": bytearray(body)}
    assert client._handle_pubrel() == mqtt.MQTT_ERR_SUCCESS  # paho takes each of them without complaint
    return b"".join(bytes(packet["packet"]) for packet in client._out_packet)


@pytest.mark.parametrize("lean", [False, True], ids=["paho", "lean"])
@pytest.mark.parametrize(
    ("command", "body"),
    [
        (0x64, b"\x00\x00\x00"),  # the fuzzer's input: fixed-header flags 0100, packet identifier 0
        (0x62, b"\x00\x00"),  # packet identifier 0
        (0x60, b"\x00\x07"),  # fixed-header flags 0000
        (0x62, b"\x00\x07\x00\x00\xff"),  # bytes past the properties
        (0x62, b"\x00\x07\x00\x80\x00"),  # a property length of 0 in two bytes
    ],
    ids=["flags-and-id-0", "id-0", "flags", "trailing", "property-length"],
)
def test_a_pubrel_mqtt_does_not_allow_is_not_answered(command: int, body: bytes, lean: bool) -> None:
    # Found by the local_packets harness: the PUBCOMP with which a PUBREL for a message no longer held is
    # completed (ChunkedReadClient) also answered a malformed one and one for packet id 0, which paho ignores.
    assert _pubrel_answer(command, body, lean=lean) == b""


@pytest.mark.parametrize("lean", [False, True], ids=["paho", "lean"])
@pytest.mark.parametrize("body", [b"\x00\x07", b"\x00\x07\x92", b"\x00\x07\x00\x00", b"\x00\x07\x00\x03\x1f\x00\x00"])
def test_a_pubrel_mqtt_allows_for_a_message_not_held_is_completed(body: bytes, lean: bool) -> None:
    # The other side of the test above: a well-formed one (reason, properties or not) still gets its PUBCOMP.
    assert _pubrel_answer(0x62, body, lean=lean) == b"\x70\x02\x00\x07"


def test_a_pubrel_on_a_connection_no_longer_connected_is_not_answered() -> None:
    client = new_client("c", manual_ack=True, lean=True)
    client._state = mqtt._ConnectionState.MQTT_CS_DISCONNECTING
    client._thread = threading.current_thread()
    client._in_packet = {**client._in_packet, "command": 0x62, "packet": bytearray(b"\x00\x07")}
    assert client._handle_pubrel() == mqtt.MQTT_ERR_SUCCESS
    assert not client._out_packet


def _held_after_connack(command: int, body: bytes, *, connected: bool) -> list[int]:
    """The QoS 2 messages a manual-ack client still holds (awaiting PUBREL) after reading this CONNACK."""
    client = new_client("c", manual_ack=True, lean=True)
    client._thread = threading.current_thread()
    client._state = mqtt._ConnectionState.MQTT_CS_CONNECTED if connected else mqtt._ConnectionState.MQTT_CS_CONNECTING
    client._in_messages[7] = mqtt.MQTTMessage(mid=7, topic=b"mcp/req/dev1/c")
    client._in_packet = {**client._in_packet, "command": command, "packet": bytearray(body)}
    client._handle_connack()
    return sorted(client._in_messages)


@pytest.mark.parametrize(
    ("command", "body", "connected"),
    [
        (0x22, b"\x00\x00\x00", True),  # the fuzzer's input: fixed-header flags 0010, on a connection already accepted
        (0x20, b"\x00\x00\x00", True),  # a second CONNACK
        (0x22, b"\x00\x00\x00", False),  # fixed-header flags 0010
        (0x20, b"\x6c\x00\x00", False),  # reserved acknowledge flags set
    ],
    ids=["flags-second", "second", "flags", "reserved"],
)
def test_a_connack_mqtt_does_not_allow_leaves_held_qos2_messages_alone(command: int, body: bytes, connected: bool) -> None:
    # Found by the local_packets harness: ChunkedReadClient forgot the QoS 2 messages awaiting release on any
    # CONNACK without a session, paho's reading of which ignores the flags and a CONNACK on a live connection.
    assert _held_after_connack(command, body, connected=connected) == [7]


def test_the_connections_connack_without_a_session_clears_held_qos2_messages() -> None:
    # The other side of the test above (tests/test_qos2.py has it with a real broker).
    assert _held_after_connack(0x20, b"\x00\x00\x00", connected=False) == []

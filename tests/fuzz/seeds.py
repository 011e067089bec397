"""Writes the hand-made seeds of tests/fuzz/corpus/ (``python -m tests.fuzz.seeds``); findings are added beside them.

Seeds are realistic and hostile inputs in each target's :class:`~tests.fuzz.fuzzed.FuzzedInput` encoding.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from tests.fixtures.hostile_broker import publish_packet, remaining_length
from tests.fuzz.fuzzed import Raw, encode, u16
from tests.fuzz.intake import STATES

CORPUS = Path(__file__).parent / "corpus"
_PING = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
_INFER = (b'{"jsonrpc":"2.0","id":"a","method":"infer","params":{"model":"vibration-anomaly","inputs":{"features":'
          b'[[0.2,0.62,3.1,3.0,0.5,0.35,0.15,41.0]]}}}')  # fmt: skip
_DEEP = b"[" * 5000 + b"]" * 5000
_HOSTILE_JSON = [
    _PING, _INFER, _DEEP, b'{"jsonrpc":"2.0","id":' + _DEEP + b',"method":"ping"}', b"\xff\xfe{}",
    b'{"jsonrpc":"2.0","id":1e400,"method":"ping"}', b'{"jsonrpc":"2.0","id":NaN,"method":"ping"}',
    b'{"jsonrpc":"2.0","id":123456789012345678901234567890,"method":"ping"}', b'[{"jsonrpc":"2.0"}]',
    b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}', b'{"id":1,"id":2,"jsonrpc":"2.0","method":"x"}', b"",
]  # fmt: skip


def _message(
    *,
    client: int = 0,
    topic: int | bytes = 0,
    qos: int = 1,
    response_topic: int | str | None = None,
    correlation_data: bytes | None = None,
    user_properties: list[tuple[str, str]] | None = None,
    expiry: int | None = None,
    payload: int | bytes = 0,
) -> list[object]:
    """One PUBLISH in the intake target's encoding (see tests/fuzz/intake.py, ``target_intake``)."""
    values: list[object] = [client, *([7, topic] if isinstance(topic, bytes) else [topic]), qos, 0]
    flags = 0x80 * any(x is not None for x in (response_topic, correlation_data, user_properties, expiry))
    flags |= (response_topic is not None) | (correlation_data is not None) << 1
    flags |= (user_properties is not None) << 2 | (expiry is not None) << 3
    values.append(flags)
    if response_topic is not None:
        values += [response_topic] if isinstance(response_topic, int) else [4, response_topic]
    if correlation_data is not None:
        values.append(correlation_data)
    if user_properties is not None:
        values += [len(user_properties), *[part for pair in user_properties for part in pair]]
    if expiry is not None:
        values.append(expiry)
    values += [0, payload] if isinstance(payload, int) else [1, payload]
    return values


def _intake() -> list[bytes]:
    messages = [
        [_message(payload=0), _message(qos=0, payload=2), _message(client=1, payload=3)],
        [_message(response_topic="mcp/res/#", payload=_INFER)],
        [_message(response_topic=2, correlation_data=b"c" * 300, payload=_PING)],
        [_message(response_topic="mcp/res/dev1/alice/\x00", payload=_PING), _message(response_topic=1, payload=4)],
        [_message(topic=b"mcp/req/dev1/\xc3\x28", payload=_PING), _message(payload=0)],
        [_message(topic=b"", payload=_PING), _message(topic=b"mcp/req/dev1/a/b", payload=1)],
        [_message(user_properties=[("k" * 60, "v" * 4000)] * 7, payload=_PING)],
        [_message(payload=_DEEP[:4000]), _message(payload=b"x" * 5000), _message(payload=b"\xff\xfe")],
        [_message(expiry=0, payload=2), _message(expiry=3, payload=0)],
        [_message(client=c % 6, payload=c % 5) for c in range(12)],
        [_message(response_topic="", payload=_PING), _message(response_topic="", payload=_DEEP[:4000])],
    ]
    return [
        encode(state, len(batch) - 1, *[value for message in batch for value in message])
        for state in range(len(STATES))
        for batch in messages
    ]


def _protocol() -> list[bytes]:
    return [encode(32, 4, Raw(payload)) for payload in _HOSTILE_JSON] + [encode(3, 1, Raw(_INFER))]


def _tensor() -> list[bytes]:
    values = [
        [[0.2, 0.62, 3.1, 3.0, 0.5, 0.35, 0.15, 41.0]], [1, [2]], [[1e39]], {"b64": "AAAAAA==", "dtype": "float32",
        "shape": [1]}, {"b64": "", "dtype": "float32", "shape": [0] * 40}, {"b64": "", "dtype": "int8",
        "shape": [2**62, 4, 0]}, {"b64": "", "dtype": "int8", "shape": [2**70]}, {"b64": "AA==", "dtype": "nope",
        "shape": [1]}, [True, False], ["a"], [[1, 2], [3]], [300, -300],
    ]  # fmt: skip
    seeds = []
    for dtype in range(8):
        for value in values:
            seeds.append(encode(dtype, 1, 1, 1, 0, 0, 0, 2, Raw(json.dumps(value).encode())))
    return seeds[:48]


def _image() -> list[bytes]:
    pictures = []
    for kind in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.new("RGB", (5, 3), (200, 40, 90)).save(buffer, kind)
        pictures.append(buffer.getvalue())
    # variant, dtype, height, width, then the picture bytes
    return [bytes([0, 0, 3, 5]) + pictures[0], bytes([4, 1, 7, 2]) + pictures[1], bytes([8, 2, 15, 15]) + pictures[1]]


def _tools_call() -> list[bytes]:
    arguments = [
        {"features": [[0.2, 0.62, 3.1, 3.0, 0.5, 0.35, 0.15, 41.0]]}, {"features": [[0] * 8], "top_k": 1001},
        {"features": [[0] * 8], "raw": "yes"}, {"readings": {"b64": "AAAA", "dtype": "int8", "shape": [1, 4]}}, {},
        {"name": 5}, {"name": "x", "arguments": []}, {"name": "vibration-anomaly", "arguments": {"prefer": "cloud"}},
    ]  # fmt: skip
    return [encode(choice, Raw(json.dumps(args).encode())) for choice in range(3) for args in arguments] + [
        encode(3, "face-detector\x00", Raw(b"{}"))
    ]


def _cloud_answer() -> list[bytes]:
    answers = [
        {"jsonrpc": "2.0", "id": 1, "result": {"top": []}}, {"error": {"code": 1, "message": "x"}, "msg_id": "m-2"},
        {"result": 5, "msg_id": "m-1"}, {"msg_id": ["m-1"]}, [1, 2],
    ]  # fmt: skip
    # user properties (count, pairs), whether msg-id is set (then which: 0, 1 pending; 2 a string), payload
    seeds = [encode(0, 1, 0, Raw(json.dumps(answer).encode())) for answer in answers]
    seeds += [encode(0, 0, Raw(b"[" * 100_000)), encode(0, 1, 0, Raw(b'{"result":{"x":NaN},"msg_id":"m-1"}'))]
    seeds += [encode(0, 1, 1, Raw(b'{"error":{"code":1e999,"message":"\\udc00"}}'))]
    seeds += [encode(0, 1, 0, Raw(b'{"result":{"x":' + b"9" * 5000 + b"}}"))]
    seeds += [encode(2, "k", "v" * 256, "k2", "v", 1, 2, "x", Raw(b"\xff"))]
    return seeds


def _cloud_stream() -> list[bytes]:
    # max packet size (2 bytes), receive maximum, piece size, then the stream as the broker sends it
    answer = b'{"jsonrpc":"2.0","msg_id":"m","result":{}}'
    flood = b"".join(publish_packet("mcp/cloud/res/dev1", answer, qos=2, packet_id=n) for n in range(1, 21))
    released = b"".join(
        publish_packet("t", b"x", qos=2, packet_id=n) + b"\x62\x02" + n.to_bytes(2, "big") for n in range(1, 21)
    )
    huge = b"\x32" + remaining_length(200 * 1024 * 1024) + b"\x00\x01t\x00\x01"
    mixed = publish_packet("a/b", b"{}", qos=1, packet_id=7) + b"\x40\x02\x00\x07\xd0\x00"
    mixed += publish_packet("c", b"", qos=0)
    return [
        encode(u16(4096), 4, 7, Raw(flood)), encode(u16(4096), 1, 3, Raw(released)),
        encode(u16(4096), 16, 1, Raw(huge)), encode(u16(60_000), 16, 255, Raw(mixed)),
        encode(u16(4096), 2, 2, Raw(b"\x30\xff\xff\xff\xff\x01")),
        *_local_stream(),
    ]  # fmt: skip


def _local_stream() -> list[bytes]:
    # The local link's guard (the receive maximum byte's high bit; the next: QoS 1 held to Receive Maximum too),
    # Receive Maximum 5: QoS 1 requests held until acknowledged. A burst one past it, an identifier reused, a DUP
    # resend, a QoS 1 on a QoS 2's identifier.
    def request(mid: int, dup: bool = False) -> bytes:
        packet = publish_packet("mcp/req/dev1/c", _PING, qos=1, packet_id=mid)
        return bytes([packet[0] | (0x08 if dup else 0)]) + packet[1:]

    burst = b"".join(request(n) for n in range(1, 7))
    reused = request(1) + request(2) + request(1)
    resent = request(1) + request(1, dup=True) + request(2) + b"\xd0\x00"
    crossed = publish_packet("t", b"", qos=2, packet_id=3) + request(3)
    cases = [(burst, 54, 64), (burst, 7, 64), (burst, 54, 0), (reused, 54, 0), (resent, 3, 64), (crossed, 255, 0)]
    return [encode(u16(4096), 128 + limited + 4, size, Raw(stream)) for stream, size, limited in cases]


def _publish(
    topic: bytes, payload: bytes, *, qos: int, mid: int = 0, properties: bytes = b"\x00", flags: int = 0
) -> bytes:
    """A PUBLISH as the local broker sends it, with ``properties`` already encoded (length first)."""
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + properties + payload
    return bytes([0x30 | qos << 1 | flags]) + remaining_length(len(body)) + body


def _local_packets() -> list[bytes]:
    # QoS 1 messages in flight before the stream, flags (1: reply inline, 2: on_log, 4: guarded, 8: QoS 1 held to
    # the guard's Receive Maximum, which is 1 + the high four bits), piece size (0: whole), stream
    request = b"mcp/req/dev1/alice"
    response = Properties(PacketTypes.PUBLISH)
    response.ResponseTopic, response.CorrelationData = "mcp/res/dev1/alice", b"c1"
    response.UserProperty = [("k", "v")]
    with_properties = response.pack()
    streams = [
        _publish(request, _PING, qos=0) + _publish(request, _PING, qos=1, mid=1)
        + _publish(request, _INFER, qos=1, mid=2),
        _publish(request, _PING, qos=1, mid=9, properties=with_properties) + _publish(request, b"", qos=0, flags=0x09),
        _publish(request, _PING, qos=2, mid=3) + b"\x62\x02\x00\x03" + _publish(request, b"x", qos=2, mid=4),
        b"\x40\x02\x00\x01\x40\x02\x00\x02\x40\x03\x00\x03\x10\x40\x04\x00\x04\x80\x00\x40\x02\x00\x63",
        b"\x40\x05\x00\x01\x00\x01\x1f",  # a property length past the end
        b"\x40\x01\x00" + _publish(request, b"after", qos=0),  # a PUBACK too short
        _publish(b"mcp/req/dev1/\xc3\x28", _PING, qos=1, mid=5) + _publish(b"\xff\xfe", b"", qos=0),
        _publish(b"", _PING, qos=0) + _publish(b"", b"", qos=1, mid=0),
        b"\x30\x05\x00\x09abc",  # a topic length past the end
        b"\x32\x04\x00\x01a\x00",  # QoS 1 without room for its packet id
        b"\x30\x03\x00\x01a",  # no property length
        _publish(request, b"x", qos=3, mid=7),  # QoS 3: paho drops the connection
        _publish(request, b"x", qos=0, properties=b"\x80\x00"),  # a property length of 0 in two bytes
        _publish(request, b"x", qos=1, mid=8, properties=b"\x03\x23\x00\x01"),  # a topic alias
        b"\x30\xff\xff\xff\xff\x01",  # a remaining length of five bytes
        _publish(request, _INFER, qos=1, mid=10)[:-7],  # cut short: the rest never arrives
        b"\xd0\x00" + b"\xe0\x00" + _publish(request, b"after", qos=0),  # PINGRESP, then DISCONNECT
        _publish(request, b"p" * 1000, qos=1, mid=11) * 3,
    ]
    guarded = [  # Receive Maximum 2: QoS 1 requests acknowledged as they arrive, QoS 2 ones left unreleased
        streams[0], streams[2], streams[-1],
        _publish(request, _PING, qos=2, mid=3) + _publish(request, _PING, qos=1, mid=3),  # an identifier reused
        b"".join(_publish(request, b"x", qos=2, mid=mid) for mid in (1, 2, 3)),  # one past Receive Maximum
        _publish(request, _PING, qos=1, mid=4) + _publish(request, _PING, qos=1, mid=4, flags=0x08),  # DUP resend
    ]
    return [
        encode(prepublished, flags, piece, Raw(stream))
        for stream in streams
        for prepublished, flags, piece in ((3, 1, 0), (0, 2, 1), (8, 3, 7))
    ] + [
        encode(prepublished, flags, piece, Raw(stream))
        for stream in guarded
        for prepublished, flags, piece in ((2, 1 | 4 | 8 | 16, 0), (0, 4 | 16, 1), (1, 1 | 4 | 8 | 16, 5))
    ]


def _puback() -> list[bytes]:
    codes = [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99, 0x05, 0xFF]
    seeds = [encode(1, 0, Raw(bytes([code]))) for code in codes]
    seeds += [encode(1, 0, Raw(bytes([0x80, 0x03, 0x1F, 0x00, 0x00]))), encode(1, 0, Raw(b"\x00\x05\x26\x00")), encode(2, 0)]
    return seeds


def _deploy_document() -> list[bytes]:
    from tests.fixtures.deploy_bundles import build_bundle, fixed_publisher

    publisher = fixed_publisher()
    signed = publisher.deployment(build_bundle(publisher.release), sequence=3)
    documents = [signed, signed.replace(b'"sequence"', b'"sequenc"'), b"{}", b"\xff", _DEEP, b'{"payload":1}']
    key_lists = [publisher.key_list(1, []), publisher.key_list(2, [publisher.release_pem]), b"[]"]
    return [encode(0, Raw(document)) for document in documents] + [encode(1, Raw(key_list)) for key_list in key_lists]


def _manifest() -> list[bytes]:
    real = (Path(__file__).resolve().parents[2] / "models" / "manifest.json").read_bytes()
    return [real, real.replace(b'"sha256"', b'"sha"'), b"{}", b'{"models":[]}', b"\xff", _DEEP, b'{"models":[{"id":1}]}',
            real.replace(b".tflite", b"/../../etc/passwd")]  # fmt: skip


def _config() -> list[bytes]:
    files = [
        (b"", b'device_id = "pi"\n'), (b"", b"\xff\xfe"), (b"[limits]\nworkers = 2\n[meta]\ndescription='x'\n",
        b'profile = "./board.toml"\n'), (b"\xff", b'profile = "./board.toml"\n'), (b"", b"[local]\nport = 70000\n"),
        (b"", b'device_id = "a/+#"\n'), (b"", b"[" * 2000), (b"", b'profile = "auto"\n'),
        (b"", b"[cloud]\nhost = 'example.com'\ntls = false\n"), (b"", b"limits = 5\n"),
    ]  # fmt: skip
    return [encode(profile, Raw(config)) for profile, config in files]


def _outbox_rows() -> list[bytes]:
    return [
        encode(0, 0, 3, "m", 5, "telemetry", 4, b"{}", 1, Raw(b"\x02" + bytes(8)), 2, Raw(bytes(8)), 2, Raw(bytes(8)),
               0, 5, "queued", 1, Raw(bytes(8)), 1, Raw(bytes(8)), 0, 0),
        encode(1, 1, 3, "m", 3, "bogus", 3, "text-body", 6, 0, 0, 2, Raw(bytes(8)), 2, Raw(bytes(8)), 0, 5, "claimed",
               1, Raw(bytes(8)), 1, Raw(bytes(8)), 0, 0),
        encode(2, 0, *([1, Raw(b"\xff" * 8)] * 12)),
        encode(3, 3, *([5, "queued"] * 36)),
    ]  # fmt: skip


def _model_file() -> list[bytes]:
    from tests.fixtures.generated_models import constant_classifier
    from tests.fixtures.tflite_metadata import TensorMeta, metadata_flatbuffer, with_metadata

    models = Path(__file__).resolve().parents[2] / "models"
    bundled = [path.read_bytes() for path in sorted(models.glob("*.tflite"))]
    metadata = metadata_flatbuffer(
        "toy", "a toy classifier", [TensorMeta("features", "two values", mean=[127.5, 0.5], std=[127.5, 2.0])],
        [TensorMeta("scores", "class probabilities", label_file="labels.txt")],
    )  # fmt: skip
    packed = with_metadata(constant_classifier([0.25, 0.75]), metadata, {"labels.txt": b"cold\nhot\n"})
    # Cut inside the flatbuffer, inside the metadata, and inside the zip archive's central directory.
    cuts = [packed[: len(packed) // 3], packed[: packed.index(b"M001") + 40], packed[:-30]]
    return [*bundled, packed, *cuts, bundled[0][:16], b"", b"\0\0\0\0TFL3"]


def _probe_state() -> list[bytes]:
    from agent.models.probe import MAX_SAVED_VERDICTS, bundled_sha256

    bundled = sorted(bundled_sha256())[0]
    crashed = "crashed the interpreter in a probe (signal 11, SIGSEGV, while allocating tensors)"
    ours = {"a" * 64: None, "b" * 64: crashed, bundled: crashed}
    many = {f"{number:064x}": None for number in range(MAX_SAVED_VERDICTS + 6)}
    documents = [
        {"runtime": "@KEY@", "verdicts": ours}, {"runtime": "another runtime 0.1, 1 bytes", "verdicts": ours},
        {"runtime": "@KEY@", "verdicts": many}, {"runtime": "@KEY@", "verdicts": []}, {"verdicts": 5}, [],
        {"runtime": "@KEY@", "verdicts": {"c" * 64: 7, "d" * 64: {"x": [1]}, "e" * 64: False, "": "", "5" * 64: "x"}},
    ]
    texts = [json.dumps(document, separators=(",", ":")).encode() for document in documents]
    return [*texts, b"", b"\xff\xfe garbage", _DEEP, b'{"runtime":"@KEY@","verdicts":{"\\ud800":NaN}}', texts[0][:40]]


SEEDS = {
    "intake": _intake, "protocol": _protocol, "tensor": _tensor, "image": _image, "tools_call": _tools_call,
    "cloud_answer": _cloud_answer, "cloud_stream": _cloud_stream, "local_packets": _local_packets, "puback": _puback, "deploy_document": _deploy_document, "manifest": _manifest, "config": _config,
    "outbox_rows": _outbox_rows, "model_file": _model_file, "probe_state": _probe_state,
}  # fmt: skip


def main() -> None:
    for target, make in SEEDS.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for seed in make():
            (folder / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}").write_bytes(seed)


if __name__ == "__main__":
    main()

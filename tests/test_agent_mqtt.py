"""The agent end to end over a real mosquitto: every method, every error code, steering, overload, restarts."""

from __future__ import annotations

import base64
import json
import os
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import BUNDLED_MODELS_DIR
from agent.models.accelerators import load_runtime
from tests.fixtures.agents import Listener, face_image_b64

MANIFEST = json.loads((BUNDLED_MODELS_DIR / "manifest.json").read_text())
EXAMPLES = [(model["id"], example) for model in MANIFEST["models"] for example in model["examples"]]


def _props(**values: object) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def _error_code(reply: dict) -> int:
    assert "error" in reply, reply
    assert reply["error"]["message"] and "\n" not in reply["error"]["message"]
    return int(reply["error"]["code"])


@pytest.mark.parametrize(("model_id", "example"), EXAMPLES, ids=[f"{m}-{e['title']}" for m, e in EXAMPLES])
def test_infer_bundled_models_answer_their_examples(start_agent, client_factory, model_id, example) -> None:
    start_agent()
    reply = client_factory("alice").call("infer", {"model": model_id, "inputs": example["inputs"]})
    result = reply["result"]
    assert result["model"] == model_id and result["served_by"] == "local" and result["model_version"]
    assert result["top"][0]["label"] == example["expect"]
    assert len(result["top"]) == 3
    assert set(result["timing_ms"]) == {"queue", "inference", "total"}
    assert result["timing_ms"]["total"] >= result["timing_ms"]["inference"]


def test_infer_int8_raw_and_top_k(start_agent, client_factory) -> None:
    start_agent()
    client = client_factory("alice")
    raw = client.call("infer", {"model": "sensor-state", "inputs": {"readings": [[-74, -13, -117, -128]]}, "raw": True, "top_k": 1})
    outputs = raw["result"]["outputs"]["probabilities"]
    assert all(isinstance(value, int) and -128 <= value <= 127 for value in outputs[0])
    assert len(raw["result"]["top"]) == 1


def test_third_party_face_detector_list_and_b64_inputs_agree(start_agent, client_factory) -> None:
    start_agent()
    client = client_factory("alice")
    image = np.random.default_rng(1).random((1, 128, 128, 3), dtype=np.float32)
    as_list = client.call("infer", {"model": "face-detector", "inputs": {"image": image.tolist()}})["result"]
    b64 = {"b64": base64.b64encode(image.astype("<f4").tobytes()).decode(), "dtype": "float32", "shape": [1, 128, 128, 3]}
    as_b64 = client.call("infer", {"model": "face-detector", "inputs": {"image": b64}})["result"]
    assert np.array(as_list["outputs"]["regressors"]).shape == (1, 896, 16)
    assert as_list["outputs"] == as_b64["outputs"]
    assert "top" not in as_list


def test_models_list_ping_and_mcp_methods(start_agent, client_factory) -> None:
    start_agent()
    client = client_factory("alice")
    assert client.call("ping") == {"jsonrpc": "2.0", "id": "alice-1", "result": {}}
    models = {m["id"]: m for m in client.call("models/list")["result"]["models"]}
    assert set(models) == {"vibration-anomaly", "sensor-state", "face-detector"}
    assert models["sensor-state"]["inputs"][0] | {"description": ""} == {
        "name": "readings", "shape": [1, 4], "dtype": "int8", "description": "",
        # Not in the bundled manifest: filled from the model file.
        "quantization": {"scale": pytest.approx(100 / 255), "zero_point": -128}}
    assert models["vibration-anomaly"]["labels"] == ["normal", "imbalance", "bearing_wear"]

    init = client.call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}})
    assert init["result"]["protocolVersion"] == "2025-06-18"
    assert "tools" in init["result"]["capabilities"] and init["result"]["serverInfo"]["name"] == "edge-agent"

    client.publish_raw(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode())
    tools = {tool["name"]: tool for tool in client.call("tools/list")["result"]["tools"]}
    schema = tools["vibration-anomaly"]["inputSchema"]
    assert schema["type"] == "object" and schema["required"] == ["features"]
    assert schema["properties"]["features"]["items"]["maxItems"] == 8

    example = MANIFEST["models"][0]["examples"][0]
    called = client.call("tools/call", {"name": "vibration-anomaly", "arguments": example["inputs"]})["result"]
    assert called["isError"] is False and called["content"][0]["type"] == "text"
    assert called["structuredContent"]["top"][0]["label"] == example["expect"]
    bad = client.call("tools/call", {"name": "vibration-anomaly", "arguments": {"features": [[1, 2]]}})["result"]
    assert bad["isError"] is True and "shape" in bad["content"][0]["text"]
    assert _error_code(client.call("tools/call", {"name": "no-such-tool", "arguments": {}})) == -32602
    time.sleep(0.3)
    assert list(client.unmatched) == []  # the notification got no reply


def test_the_configured_runtime_is_reported_in_models_list_and_status(start_agent, client_factory) -> None:
    # make test-compat runs this file with EDGE_AGENT_INFERENCE__RUNTIME=tflite-runtime
    agent = start_agent()
    expected = os.environ.get("EDGE_AGENT_INFERENCE__RUNTIME", load_runtime().name)
    assert agent.models.runtime.name == expected
    assert client_factory("alice").call("models/list")["result"]["runtime"] == expected
    assert agent.status_document()["runtime"] == expected


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b'{"jsonrpc":"2.0","id":"e1",', -32700),
        (b'{"jsonrpc":"2.0","id":"e1","method":"infer","params":{"model":"vibration-anomaly","inputs":{"features":[[NaN]]}}}', -32700),
        (b'[{"jsonrpc":"2.0","id":"e1","method":"ping"}]', -32600),
        (b'{"jsonrpc":"2.0","id":"e1","method":"ping","params":{"a":' + b"[" * 100 + b"]" * 100 + b"}}", -32600),
        (b'{"id":"e1","method":"ping"}', -32600),
    ],
)
def test_unreadable_requests_get_errors_with_null_id(start_agent, client_factory, payload, code) -> None:
    start_agent()
    client = client_factory("alice")
    client.publish_raw(payload)
    deadline = time.monotonic() + 10
    while not client.unmatched and time.monotonic() < deadline:
        time.sleep(0.02)
    (reply,) = client.unmatched
    assert reply["id"] is None and _error_code(reply) == code


def test_oversized_payload_refused_before_parsing(start_agent, client_factory) -> None:
    agent = start_agent(limits={"max_payload_bytes": 4096})
    client = client_factory("alice")
    client.publish_raw(b"{" + b" " * 5000 + b"}")
    deadline = time.monotonic() + 10
    while not client.unmatched and time.monotonic() < deadline:
        time.sleep(0.02)
    (reply,) = client.unmatched
    assert _error_code(reply) == -32600 and reply["id"] is None and "4096" in reply["error"]["message"]
    assert agent.counters["oversized"] == 1


@pytest.mark.parametrize(
    ("method", "params", "code", "needle"),
    [
        ("no/such", None, -32601, "no/such"),
        ("infer", {"model": "missing", "inputs": {}}, -32602, "missing"),
        ("infer", {"model": "vibration-anomaly", "inputs": {"nope": [1]}}, -32602, "features"),
        ("infer", {"model": "vibration-anomaly", "inputs": {"features": [[1, 2, 3]]}}, -32602, "shape"),
        ("infer", {"model": "vibration-anomaly", "inputs": {"features": [["a"] * 8]}}, -32602, "numbers"),
        ("infer", {"model": "vibration-anomaly", "inputs": {"features": {"b64": base64.b64encode(np.full(8, np.inf, "<f4").tobytes()).decode(), "dtype": "float32", "shape": [1, 8]}}}, -32602, "NaN"),
        ("infer", {"model": "vibration-anomaly", "inputs": {"features": [[0] * 8]}, "bogus": 1}, -32602, "bogus"),
        ("infer", [1, 2], -32602, "object"),
    ],
)
def test_bad_requests_get_their_error_codes(start_agent, client_factory, method, params, code, needle) -> None:
    start_agent()
    reply = client_factory("alice").call(method, params)
    assert _error_code(reply) == code and needle in reply["error"]["message"]
    assert reply["id"] == "alice-1"


def test_response_topic_honoured_inside_client_space_and_refused_outside(start_agent, client_factory, local_broker) -> None:
    start_agent()
    client = client_factory("alice")
    spy = Listener(local_broker, "mcp/res/dev1/#")
    try:
        request = json.dumps({"jsonrpc": "2.0", "id": "r1", "method": "ping"}).encode()
        client.publish_raw(request, properties=_props(ResponseTopic="mcp/res/dev1/alice/s1", CorrelationData=b"corr-1"))
        assert spy.wait_for(lambda msgs: any(m.topic == "mcp/res/dev1/alice/s1" for m in msgs))
        steered = next(m for m in spy.messages if m.topic == "mcp/res/dev1/alice/s1")
        assert steered.properties.CorrelationData == b"corr-1"

        for bad_topic, corr in (("mcp/res/dev1/bob", b"c"), ("mcp/status/dev1", b"c"), ("mcp/res/dev1/alice/s1", b"x" * 500)):
            client.publish_raw(
                json.dumps({"jsonrpc": "2.0", "id": bad_topic, "method": "ping"}).encode(),
                properties=_props(ResponseTopic=bad_topic, CorrelationData=corr),
            )
        assert spy.wait_for(lambda msgs: sum(m.topic == "mcp/res/dev1/alice" for m in msgs) == 3)
        refusals = [json.loads(m.payload) for m in spy.messages if m.topic == "mcp/res/dev1/alice"]
        assert {_error_code(reply) for reply in refusals} == {-32004}
        assert not any(m.topic in ("mcp/res/dev1/bob",) for m in spy.messages)
    finally:
        spy.close()


def test_bad_identity_segment_is_ignored_and_counted(start_agent, client_factory, local_broker) -> None:
    agent = start_agent()
    client = client_factory("alice")
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    raw.connect(local_broker.host, local_broker.port)
    raw.loop_start()
    raw.publish("mcp/req/dev1/", b'{"jsonrpc":"2.0","id":1,"method":"ping"}', qos=1).wait_for_publish(5)
    raw.disconnect()
    raw.loop_stop()
    assert client.call("ping")["result"] == {}
    deadline = time.monotonic() + 5
    while agent.counters["ignored_topic"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent.counters["ignored_topic"] == 1


def test_retained_request_is_never_served(start_agent, client_factory, local_broker) -> None:
    client = client_factory("alice")
    client.publish_raw(b'{"jsonrpc":"2.0","id":"old","method":"ping"}', retain=True).wait_for_publish(5)
    agent = start_agent()
    assert client.call("ping")["id"] == "alice-1"
    time.sleep(0.3)
    assert list(client.unmatched) == [] and agent.counters["ok"] == 1
    client.publish_raw(b"", retain=True).wait_for_publish(5)


def test_expired_request_is_refused_or_dropped_unrun(start_agent, client_factory) -> None:
    agent = start_agent(limits={"workers": 1, "intake_queue": 1000})
    client = client_factory("alice")
    # Images as nested JSON lists (~0.5 MB each): parsing and converting them keeps the one worker busy for
    # well over the 1 s expiry, however fast the inference itself is. The blockers' own deadline is far off:
    # on a loaded machine 40 of them take longer than the default 30 s, and they were refused or expired too.
    image = np.random.default_rng(0).random((1, 128, 128, 3), dtype=np.float32).round(4).tolist()
    blocker = {"model": "face-detector", "inputs": {"image": image}, "timeout_ms": 3_600_000}
    blockers = [client.send("infer", blocker) for _ in range(40)]
    client.publish_raw(b'{"jsonrpc":"2.0","id":"stale","method":"ping"}', properties=_props(MessageExpiryInterval=1))
    for future in blockers:
        future.result(120)
    assert client.call("ping")["result"] == {}
    # Refused at once when the measured wait ahead already exceeds its expiry, else dropped when it expires
    # in the intake; never run.
    refused = [reply for reply in client.unmatched if reply.get("id") == "stale"]
    if agent.counters["expired"] == 0 and not refused:
        pytest.skip("this machine served 40 large inferences within the 1 s expiry; nothing expired")
    assert agent.counters["expired"] + agent.counters["deadline_unmeetable"] == 1
    assert all(_error_code(reply) == -32008 for reply in refused) and len(refused) == agent.counters["deadline_unmeetable"]


def test_flood_beyond_intake_gets_overloaded_replies_and_agent_stays_responsive(start_agent, client_factory) -> None:
    agent = start_agent(limits={"intake_queue": 2, "workers": 1, "refusal_replies_burst": 1000})
    flooder = client_factory("flooder")
    image = face_image_b64()
    futures = [flooder.send("infer", {"model": "face-detector", "inputs": {"image": image}}) for _ in range(100)]
    replies = [future.result(120) for future in futures]
    overloaded = [reply for reply in replies if "error" in reply]
    assert overloaded and all(_error_code(reply) == -32001 for reply in overloaded)
    assert all(reply["id"] is not None for reply in overloaded)
    assert agent.counters["overloaded"] == len(overloaded)
    assert client_factory("bob").call("ping", timeout=10)["result"] == {}


def test_broker_restart_mid_stream_loses_no_request(start_agent, client_factory, local_broker) -> None:
    # The intake holds a whole redelivery burst, so every request gets its real answer, not "overloaded".
    start_agent(limits={"intake_queue": 256})
    client = client_factory("alice", session_expiry=600)
    example = MANIFEST["models"][0]["examples"][0]["inputs"]
    first = [client.send("infer", {"model": "vibration-anomaly", "inputs": example}) for _ in range(50)]
    local_broker.restart()
    second = [client.send("infer", {"model": "vibration-anomaly", "inputs": example}) for _ in range(50)]
    for future in first + second:
        assert future.result(30)["result"]["top"][0]["label"] == "normal"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=300) | st.recursive(st.none() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["jsonrpc", "id", "method", "params", "model", "inputs"]), c, max_size=4), max_leaves=12).map(lambda v: json.dumps(v).encode()))
def test_garbage_never_crashes_the_agent(shared_agent, payload: bytes) -> None:
    agent, client = shared_agent
    client.publish_raw(payload)
    assert client.call("ping", timeout=10)["result"] == {}
    assert agent.threads_alive()


def test_b64_outputs_carry_the_same_tensors_as_lists(start_agent, client_factory) -> None:
    start_agent()
    client = client_factory("alice")
    image = face_image_b64(3)
    as_lists = client.call("infer", {"model": "face-detector", "inputs": {"image": image}})["result"]["outputs"]
    as_b64 = client.call("infer", {"model": "face-detector", "inputs": {"image": image}, "output_encoding": "b64"})
    for name, tensor in as_b64["result"]["outputs"].items():
        decoded = np.frombuffer(base64.b64decode(tensor["b64"]), dtype="<" + np.dtype(tensor["dtype"]).str[1:])
        assert tensor["shape"] == list(np.shape(as_lists[name]))
        assert decoded.reshape(tensor["shape"]).tolist() == as_lists[name]

"""Parsing requests and topics: every input either parses or raises a RequestError with a stable code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import InvalidRequest, ParseError, RequestError
from agent.mqtt import topics
from agent.serving.protocol import nesting_depth, parse_request, result_reply
from agent.signing import normalise
from agent.signing.outgoing import encode_unsigned

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


def test_valid_request_and_notification() -> None:
    request = parse_request(b'{"jsonrpc":"2.0","id":"42","method":"ping"}', max_depth=32)
    assert (request.id, request.method, request.is_notification) == ("42", "ping", False)
    note = parse_request(b'{"jsonrpc":"2.0","method":"notifications/initialized"}', max_depth=32)
    assert note.is_notification
    null_id = parse_request(b'{"jsonrpc":"2.0","id":null,"method":"ping"}', max_depth=32)
    assert null_id.id is None and not null_id.is_notification


@given(st.text(max_size=12), st.sampled_from(["res", "audit", "telemetry", "x/y", "", "+"]), st.booleans())
def test_upstream_topic_parts_round_trip(device_id: str, record_class: str, batch: bool) -> None:
    topic = topics.upstream_topic(device_id, record_class) + ("/batch" if batch else "")
    usable = topics.is_valid_segment(device_id) and topics.is_valid_segment(record_class) and record_class != "fallback"
    assert topics.upstream_topic_parts(topic) == ((device_id, record_class) if usable else None)


@given(st.text(alphabet="mcpu/+#ab", max_size=30))
def test_upstream_topic_parts_accepts_only_upstream_topics(topic: str) -> None:
    parts = topics.upstream_topic_parts(topic)
    if parts is not None:
        device_id, record_class = parts
        assert topic in (topics.upstream_topic(device_id, record_class), topics.upstream_topic(device_id, record_class) + "/batch")


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{", ParseError),
        (b'{"jsonrpc":"2.0","id":1,"method":"infer","params":{"x":NaN}}', ParseError),
        (b'{"jsonrpc":"2.0","id":1,"method":"infer","params":{"x":-Infinity}}', ParseError),
        (b"\xff\xfe", ParseError),
        (b"[]", InvalidRequest),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', InvalidRequest),
        (b'"ping"', InvalidRequest),
        (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', InvalidRequest),
        (b'{"jsonrpc":"2.0","id":1}', InvalidRequest),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', InvalidRequest),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', InvalidRequest),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","extra":1}', InvalidRequest),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":' + b"[" * 40 + b"]" * 40 + b"}", InvalidRequest),
    ],
)
def test_malformed_requests_raise_their_code(payload: bytes, error: type[RequestError]) -> None:
    with pytest.raises(error) as caught:
        parse_request(payload, max_depth=32)
    assert caught.value.message and "\n" not in caught.value.message


def _true_depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_true_depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_true_depth(item) for item in value.values()), default=0)
    return 0


@given(json_values)
def test_nesting_depth_matches_the_parsed_structure(value: object) -> None:
    assert nesting_depth(json.dumps(value).encode()) == _true_depth(value)


@given(st.text(alphabet='[]{}"\\', max_size=40).map(lambda s: '{"k":"' + s.replace("\\", "").replace('"', "") + '"}'))
def test_brackets_inside_strings_do_not_count(text: str) -> None:
    assert nesting_depth(text.encode()) == 1


@settings(max_examples=300)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_garbage_only_ever_raises_request_errors(payload: bytes) -> None:
    try:
        parse_request(payload, max_depth=8)
    except RequestError:
        pass


def test_non_finite_outputs_are_sent_as_the_strings_signed_messages_use() -> None:
    array = np.array([[1.5, np.nan, np.inf, -np.inf]], dtype=np.float32)
    reply = result_reply(1, {"outputs": {"v": array.tolist()}})
    assert json.loads(encode_unsigned(reply))["result"]["outputs"]["v"] == [[1.5, "NaN", "Infinity", "-Infinity"]]


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.floats() | st.text(),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=30,
    )
)
def test_unsigned_messages_carry_the_normalised_values(value: object) -> None:
    assert json.loads(encode_unsigned({"v": value})) == normalise({"v": value})


@given(st.text(max_size=20))
def test_request_topic_round_trip(client_id: str) -> None:
    topic = topics.request_topic("dev1", client_id)
    parsed = topics.client_id_from_request_topic(topic, "dev1")
    if client_id and not any(ch in client_id for ch in "+#/\x00"):
        assert parsed == client_id
    else:
        assert parsed is None


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("mcp/res/dev1/alice", True),
        ("mcp/res/dev1/alice/session-7", True),
        ("mcp/res/dev1/alice/a/b", True),
        ("mcp/res/dev1/bob", False),
        ("mcp/res/dev1/alice2", False),
        ("mcp/res/dev1/alice/+", False),
        ("mcp/res/dev1/alice/#", False),
        ("mcp/res/dev1/alice/\x00", False),
        ("mcp/res/dev1/alice/", False),
        ("mcp/status/dev1", False),
        ("mcp/up/dev1/res", False),
        ("mcp/res/dev1/alice/" + "x" * 300, False),
    ],
)
def test_response_topic_steering(topic: str, allowed: bool) -> None:
    assert topics.response_topic_allowed(topic, "dev1", "alice", max_bytes=256) is allowed


@settings(max_examples=300)
@given(st.text(max_size=40) | st.sampled_from(["\ufeff{}", '\ufeff{"jsonrpc":"2.0","method":"ping"}', "NaN", "[1,-Infinity]"]))
def test_a_parse_error_names_what_json_loads_would(text: str) -> None:
    # The parser shares one decoder instead of calling json.loads; its refusals must read the same.
    try:
        json.loads(text, parse_constant=lambda token: (_ for _ in ()).throw(ValueError(f"{token} is not valid JSON")))
    except (ValueError, RecursionError) as exc:
        expected: str | None = f"payload is not valid JSON: {exc}"
    else:
        expected = None
    try:
        parse_request(text.encode("utf-8", "surrogatepass"), max_depth=32)
    except ParseError as error:
        assert error.message == expected
    except RequestError:  # refused for its shape (nesting) before or its envelope after parsing
        pass
    else:
        assert expected is None

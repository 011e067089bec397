"""Counting a request's JSON values before parsing it: never below the true count, exact when it can be."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agent.errors import InvalidRequest
from agent.serving.protocol import check_shape, estimated_elements, nesting_depth

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=6), children, max_size=6),
    max_leaves=60,
)


def values_and_empty_containers(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, dict)):
        members = list(value.values()) if isinstance(value, dict) else value
        counts = [values_and_empty_containers(member) for member in members]
        return 1 + sum(v for v, _ in counts), int(not members) + sum(e for _, e in counts)
    return 1, 0


@given(value=json_values, indent=st.sampled_from([None, 2]), ascii_only=st.booleans())
def test_the_estimate_counts_every_value_and_overcounts_only_empty_containers(
    value: Any, indent: int | None, ascii_only: bool
) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    values, empty = values_and_empty_containers(value)
    assert estimated_elements(text) == values + empty


def test_commas_and_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"id": "a,b,[c],{d}", "params": ['\\",[', 'x\\"y,', 1]}).encode()
    assert estimated_elements(text) == 1 + 2 + 3  # the object, its 2 members, the list's 3 items


def test_a_flood_of_numbers_is_counted_without_parsing() -> None:
    payload = b'{"jsonrpc":"2.0","id":1,"method":"infer","params":{"inputs":{"x":[' + b"0," * 99_999 + b"0]}}}"
    assert estimated_elements(payload) == 100_000 + 7  # the numbers; 3 objects, 3 scalars and the list


@given(
    value=json_values,
    max_depth=st.integers(min_value=2, max_value=8),
    max_values=st.none() | st.integers(min_value=1, max_value=80),
)
def test_the_shape_check_refuses_exactly_what_the_exact_figures_exceed(
    value: Any, max_depth: int, max_values: int | None
) -> None:
    # Brackets and commas inside strings make the quick raw-byte bounds overshoot; the check must then
    # fall back to the exact figures instead of refusing.
    text = json.dumps(value).encode()
    too_deep = nesting_depth(text) > max_depth
    too_many = max_values is not None and estimated_elements(text) > max_values
    try:
        check_shape(text, max_depth=max_depth, max_values=max_values)
    except InvalidRequest:
        assert too_deep or too_many
    else:
        assert not (too_deep or too_many)

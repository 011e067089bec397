"""The fast canonical form (C encoder, sorted keys) must equal RFC 8785 byte for byte whenever it is used."""

from __future__ import annotations

import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.signing.canonical import canonical_bytes, normalise

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=40,
)


@settings(max_examples=500)
@given(json_values)
def test_canonical_bytes_equal_rfc8785_for_any_normalised_value(value: object) -> None:
    normalised = normalise(value)
    assert canonical_bytes(normalised) == rfc8785.dumps(normalised)


@given(st.floats(allow_nan=False, allow_infinity=False, width=32) | st.floats(min_value=-1e22, max_value=1e22))
def test_model_output_floats_take_the_exact_form(number: float) -> None:
    value = normalise({"outputs": [[number, number / 3]], "score": round(number, 6)})
    assert canonical_bytes(value) == rfc8785.dumps(value)


number_like_text = st.text(alphabet="0123456789.eE+-,:[]{} ", max_size=12)


@given(st.recursive(
    number_like_text | st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53) + 1, 2**53 - 1),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(number_like_text, children, max_size=4),
    max_leaves=20,
))
def test_strings_that_look_like_numbers_never_hide_a_number_jcs_writes_differently(value: object) -> None:
    # Without backslashes the fast path separates string literals by splitting on quotes; a misplaced
    # split would let an exponent or integral float outside strings through the C encoder's form.
    normalised = normalise(value)
    assert canonical_bytes(normalised) == rfc8785.dumps(normalised)


any_scalar = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN, both infinities and -0.0 included
    | st.floats(width=32)
    | st.text()
    | st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))  # lone surrogates
)


def _same(left: object, right: object) -> bool:
    """Equal, and of the same types all the way down (0 and 0.0 are equal but take different JSON forms)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, list):
        return len(left) == len(right) and all(_same(a, b) for a, b in zip(left, right))  # type: ignore[arg-type]
    if isinstance(left, dict):
        same_keys = left.keys() == right.keys()  # type: ignore[attr-defined]
        return same_keys and all(_same(value, right[key]) for key, value in left.items())  # type: ignore[index]
    return left == right


@settings(max_examples=500)
@given(st.lists(any_scalar, max_size=6), st.text(max_size=4))
def test_values_inside_lists_and_objects_normalise_as_they_do_alone(values: list[object], key: str) -> None:
    # normalise inlines the commonest values of lists and objects (finite non-zero floats, ASCII strings);
    # each must come out exactly as normalising it alone does.
    assert _same(normalise(values), [normalise(value) for value in values])
    for value in values:
        assert _same(normalise({key: value}), {normalise(key): normalise(value)})

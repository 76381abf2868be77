"""RFC 8785 canonical JSON: fixed vectors, properties and strict decoding."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsia_core._canonical import MAX_SAFE_INTEGER
from pyrsia_core.errors import EncodingError

from pyrsia_core import canonical_json, canonical_loads

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)


def test_rfc8785_vectors() -> None:
    # Key order is by UTF-16 code units: U+1F600 (D83D DE00) sorts before U+FFFF.
    assert canonical_json({"\uffff": 1, "\U0001f600": 2, "a": 3}) == (
        '{"a":3,"\U0001f600":2,"\uffff":1}'.encode()
    )
    # RFC 8785 §3.2.2.2 string escaping: only the mandatory escapes, lowercase hex.
    assert canonical_json('\u0007\n"\\/\u00e9\u2028') == b'"\\u0007\\n\\"\\\\/\xc3\xa9\xe2\x80\xa8"'
    assert canonical_json([True, False, None, 0, -1]) == b"[true,false,null,0,-1]"
    assert canonical_json({"b": [], "a": {}}) == b'{"a":{},"b":[]}'


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_round_trip_is_exact(value: object) -> None:
    encoded = canonical_json(value)
    decoded = canonical_loads(encoded, require_canonical=True)
    assert decoded == value
    assert canonical_json(decoded) == encoded
    # The stdlib parser reads the same value: canonical JSON is plain JSON.
    assert json.loads(encoded) == value


@given(st.dictionaries(st.text(max_size=6), st.integers(0, 9), min_size=2, max_size=6))
def test_key_order_does_not_matter(d: dict[str, int]) -> None:
    reordered = dict(reversed(list(d.items())))
    assert canonical_json(d) == canonical_json(reordered)


@pytest.mark.parametrize(
    "value",
    [1.5, float("nan"), 2**53, -(2**53), {1: "x"}, b"bytes", {"a": object()}, "\ud800"],
)
def test_unencodable_values_are_rejected(value: object) -> None:
    with pytest.raises(EncodingError):
        canonical_json(value)


@pytest.mark.parametrize(
    "text",
    [b'{"a":1,"a":2}', b"1.0", b"NaN", b"[1,", b"\xff", b'{"a":1e3}', b""],
)
def test_strict_decoding(text: bytes) -> None:
    with pytest.raises(EncodingError):
        canonical_loads(text)


def test_require_canonical_rejects_other_spellings() -> None:
    with pytest.raises(EncodingError):
        canonical_loads(b'{"b":1, "a":2}', require_canonical=True)
    assert canonical_loads(b'{"a":2,"b":1}', require_canonical=True) == {"a": 2, "b": 1}


def test_deep_nesting_is_an_encoding_error() -> None:
    value: object = []
    for _ in range(100):
        value = [value]
    with pytest.raises(EncodingError):
        canonical_json(value)
    with pytest.raises(EncodingError):
        canonical_loads(b"[" * 100000 + b"]" * 100000)


flat_objects = st.dictionaries(
    st.text(alphabet=st.characters(max_codepoint=127), max_size=12),
    st.text() | st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER),
    max_size=15,
)


@given(flat_objects)
@settings(max_examples=500, deadline=None)
def test_fast_path_writes_the_same_bytes(value: dict[str, object]) -> None:
    from pyrsia_core._canonical import canonical_flat_object

    try:
        expected = canonical_json(value)
    except EncodingError:
        with pytest.raises(EncodingError):
            canonical_flat_object(value)  # type: ignore[arg-type]
        return
    assert canonical_flat_object(value) == expected  # type: ignore[arg-type]


any_keys = st.recursive(
    st.none() | st.booleans() | st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@given(any_keys)
@settings(max_examples=500, deadline=None)
def test_fast_encoder_equals_reference(value: object) -> None:
    from pyrsia_core._canonical import canonical_json_reference

    try:
        expected = canonical_json_reference(value)
    except EncodingError:
        with pytest.raises(EncodingError):
            canonical_json(value)
        return
    assert canonical_json(value) == expected

"""Part lists of large blobs: building, the logged document, checking parts."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrsia_core import Digest, PartList, PartListError, canonical_json

K = 64 * 1024


@given(size=st.integers(1, 5 * K + 3), cuts=st.lists(st.integers(1, 3 * K), max_size=8))
def test_parts_do_not_depend_on_chunking(size: int, cuts: list[int]) -> None:
    data = random.Random(size).randbytes(size)
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(data[pos : pos + c])
        pos += c
    chunks.append(data[pos:])
    whole = PartList.of_chunks(Digest.of(data), [data], part_size=K)
    assert PartList.of_chunks(Digest.of(data), chunks, part_size=K) == whole
    assert len(whole) == -(-size // K) and whole.size == size
    for i in range(len(whole)):
        offset, length = whole.span(i)
        assert whole.check(i, data[offset : offset + length])
        assert not whole.check(i, data[offset : offset + length - 1])
        flipped = bytes([data[offset] ^ 1]) + data[offset + 1 : offset + length]
        assert not whole.check(i, flipped)
    again = PartList.from_bytes(whole.to_bytes(), expected=whole.digest)
    assert again == whole


def test_bad_documents_are_refused() -> None:
    data = b"x" * (3 * K)
    good = PartList.of_chunks(Digest.of(data), [data], part_size=K)
    doc = good.to_json()
    with pytest.raises(PartListError, match="do not match"):
        PartList.from_bytes(good.to_bytes(), expected=Digest.of(b"other"))
    for change in (
        {"parts": doc["parts"][:-1]},  # one part missing
        {"parts": [*doc["parts"], doc["parts"][0]]},  # one too many
        {"parts": ["AB" * 32] * 3},  # not lowercase hex
        {"part_size": 1000},  # below the minimum
        {"size": 0},
        {"size": "3"},
        {"blob": "md5:abc"},
        {"extra": 1},
    ):
        with pytest.raises(PartListError):
            PartList.from_bytes(canonical_json({**doc, **change}))
    with pytest.raises(PartListError, match="canonical"):
        PartList.from_bytes(b'{ "blob": 1 }')
    with pytest.raises(IndexError):
        good.span(3)

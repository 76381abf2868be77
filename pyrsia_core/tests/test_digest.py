from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyrsia_core.errors import DigestError, DigestMismatch, VerificationError

from pyrsia_core import Digest, DigestVerifier


def test_parse_and_render() -> None:
    hex_ = hashlib.sha256(b"pyrsia").hexdigest()
    d = Digest.parse(f"sha256:{hex_}")
    assert d.hex == hex_ and str(d) == f"sha256:{hex_}" and d.raw == bytes.fromhex(hex_)
    assert Digest.of(b"pyrsia") == d and Digest.from_hex(hex_) == d


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256",
        "sha256:",
        "sha256:abc",
        "sha256:" + "A" * 64,
        "sha256:" + "g" * 64,
        "sha256:" + "a" * 65,
        "sha512:" + "a" * 128,
        "md5:" + "a" * 32,
        "SHA256:" + "a" * 64,
        "a" * 64,
        "sha256:" + "a" * 63 + "\n",
        "x" * 10_000,
    ],
)
def test_malformed_digests_are_rejected(text: str) -> None:
    with pytest.raises(DigestError):
        Digest.parse(text)


def test_non_string_is_rejected() -> None:
    with pytest.raises(DigestError):
        Digest.parse(b"sha256:" + b"a" * 64)  # type: ignore[arg-type]


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_streaming_verifier_matches_hashlib(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    v = DigestVerifier(expected=Digest.of(data), expected_size=len(data))
    for c in chunks:
        v.update(c)
    assert v.verify() == Digest.of(data)


def test_verifier_rejects_wrong_bytes_and_sizes() -> None:
    expected = Digest.of(b"hello")
    v = DigestVerifier(expected=expected)
    v.update(b"hellO")
    with pytest.raises(DigestMismatch) as info:
        v.verify()
    assert isinstance(info.value, VerificationError)
    # Too many bytes: fails as soon as the limit is crossed, before verify().
    v = DigestVerifier(expected=expected, expected_size=5)
    with pytest.raises(DigestMismatch):
        v.update(b"hello!")
    # Too few bytes.
    v = DigestVerifier(expected=expected, expected_size=6)
    v.update(b"hello")
    with pytest.raises(DigestMismatch):
        v.verify()

"""Node identity: Ed25519 keys, node ids, signing and verification."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from .errors import KeyError_, SignatureError

__all__ = [
    "Ed25519Signer",
    "Ed25519Verifier",
    "PublicKey",
    "Signer",
    "Verifier",
    "node_id_of",
]


def _check_raw_key(_: object, __: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise KeyError_("an Ed25519 public key is 32 raw bytes")


@attrs.frozen
class PublicKey:
    """A raw 32-byte Ed25519 public key."""

    raw: bytes = attrs.field(validator=_check_raw_key, repr=False)

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        if not isinstance(text, str) or len(text) != 64:
            raise KeyError_("an Ed25519 public key is 64 hex characters")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise KeyError_("public key is not hex") from None
        if raw.hex() != text:
            raise KeyError_("public key hex must be lowercase")
        return cls(raw)

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @property
    def node_id(self) -> str:
        """Lowercase hex SHA-256 of the raw public key."""
        return node_id_of(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.hex[:16]}…)"


def node_id_of(raw_public_key: bytes) -> str:
    """A node's id: the lowercase hex SHA-256 of its raw 32-byte Ed25519 public key."""
    return hashlib.sha256(raw_public_key).hexdigest()


class Signer(ABC):
    """Something that signs bytes with a key whose public half is known."""

    @property
    @abstractmethod
    def public_key(self) -> PublicKey: ...

    @abstractmethod
    def sign(self, payload: bytes) -> bytes:
        """Return a 64-byte Ed25519 signature over ``payload``."""

    @property
    def node_id(self) -> str:
        return self.public_key.node_id


class Verifier(ABC):
    """Checks signatures; :meth:`verify` returns ``None`` or raises :class:`SignatureError`."""

    @property
    @abstractmethod
    def public_key(self) -> PublicKey: ...

    @abstractmethod
    def verify(self, signature: bytes, payload: bytes) -> None: ...


@attrs.define(eq=False, repr=False)
class Ed25519Signer(Signer):
    """An Ed25519 private key held in memory."""

    _key: Ed25519PrivateKey
    _public: PublicKey = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._public = PublicKey(
            self._key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Ed25519Signer:
        """Deterministic key from a 32-byte seed (tests and simulations)."""
        if len(seed) != 32:
            raise KeyError_("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_pem(cls, data: bytes) -> Ed25519Signer:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyError_(f"cannot read private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyError_("private key is not an Ed25519 key")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, payload: bytes) -> bytes:
        return self._key.sign(payload)

    def verifier(self) -> Ed25519Verifier:
        return Ed25519Verifier(self._public)

    def __repr__(self) -> str:
        return f"Ed25519Signer(node_id={self.node_id[:16]}…)"


@attrs.define(eq=False)
class Ed25519Verifier(Verifier):
    """Verifies Ed25519 signatures made by one public key."""

    _public: PublicKey
    _key: Ed25519PublicKey = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._key = Ed25519PublicKey.from_public_bytes(self._public.raw)

    @property
    def public_key(self) -> PublicKey:
        return self._public

    def verify(self, signature: bytes, payload: bytes) -> None:
        if not isinstance(signature, bytes) or len(signature) != 64:
            raise SignatureError("an Ed25519 signature is 64 bytes")
        # libsodium checks an Ed25519 signature in half the time OpenSSL takes here
        # (56 vs 110 us), and it is the hot path of ledger sync; it is also the stricter
        # of the two (canonical S, no small-order keys), so every node agrees with it.
        try:
            crypto_sign_open(signature + payload, self._public.raw)
        except (BadSignatureError, ValueError):
            raise SignatureError(
                f"signature does not verify for node {self._public.node_id[:16]}…"
            ) from None

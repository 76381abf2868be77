"""Persistence of the ledger and transparency log through a :class:`KeyValueStore`.

Layout (all integers big-endian, fixed width, so keys sort in numeric order)::

    h                               head: {"height", "hash", "tree_size"}
    v                               validator set after the head: {node_id: public key hex}
    b/<height:8>                    {"header": ..., "certificate": ..., "first": index}
    r/<index:8>                     <height:8> + signed record (canonical JSON)
    p/<type>\\0<package id>\\0<index:8>   ""  (records of a package)
    a/<artifact hex>/<index:8>      ""  (records of an artifact hash)
    m/<level:1><page:4>             a page of Merkle complete-subtree hashes

A block is written with one atomic batch, so a crash leaves either the old
head or the new one. Reload reads the Merkle pages (no rehashing) and checks
that the stored tree's root is the head's root.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final

import attrs

from ._canonical import canonical_json, canonical_loads
from ._checkpoint import SignedNote
from ._identity import PublicKey
from ._ledger import Block, CommittedBlock, Ledger, ValidatorSet
from ._merkle import PAGE_HASHES, MerkleTree
from ._records import SignedRecord
from .errors import BlockError, EncodingError, StoreError
from .interfaces import KeyValueStore

__all__ = ["LogStore", "StoredRecord"]

_U64: Final = struct.Struct(">Q")
_PAGE_KEY: Final = struct.Struct(">BI")
HEAD: Final = b"h"
VALIDATORS: Final = b"v"


def _u64(n: int) -> bytes:
    return _U64.pack(n)


def _block_key(height: int) -> bytes:
    return b"b/" + _u64(height)


def _record_key(index: int) -> bytes:
    return b"r/" + _u64(index)


def _package_prefix(package_type: str, package_id: str) -> bytes:
    return b"p/" + package_type.encode() + b"\0" + package_id.encode() + b"\0"


def _artifact_prefix(artifact_hash: str) -> bytes:
    return b"a/" + artifact_hash.encode() + b"/"


@attrs.frozen
class StoredRecord:
    """A record as stored: its leaf index and the height of the block that holds it."""

    index: int
    height: int
    signed: SignedRecord


@attrs.define(eq=False)
class LogStore:
    """The ledger plus indexes, kept in a key-value store."""

    kv: KeyValueStore
    ledger: Ledger

    @classmethod
    async def open(
        cls,
        kv: KeyValueStore,
        genesis: CommittedBlock | None = None,
        *,
        record_verifier: Callable[[Sequence[SignedRecord]], None] | None = None,
    ) -> LogStore:
        """Reload the stored ledger, or start a new one from ``genesis``.

        A store holding another network's genesis raises :class:`BlockError`.
        ``record_verifier`` replaces the ledger's sequential signature checks.
        """
        store = await cls._open(kv, genesis)
        if record_verifier is not None:
            store.ledger.record_verifier = record_verifier
        return store

    @classmethod
    async def _open(cls, kv: KeyValueStore, genesis: CommittedBlock | None) -> LogStore:
        head_raw = await kv.get(HEAD)
        if head_raw is None:
            if genesis is None:
                raise StoreError("the store holds no ledger and no genesis block was given")
            ledger = Ledger.start(genesis)
            store = cls(kv, ledger)
            await store._write_block(genesis, first=0, leaves_from=0)
            return store
        store = cls(kv, await cls._reload(kv))
        if genesis is not None and genesis.block.hash != store.ledger.genesis_hash:
            raise BlockError(
                "genesis", "the data directory belongs to another network (genesis differs)"
            )
        return store

    @staticmethod
    async def _reload(kv: KeyValueStore) -> Ledger:
        try:
            head = canonical_loads(await kv.get(HEAD) or b"")
            members = canonical_loads(await kv.get(VALIDATORS) or b"")
        except EncodingError as exc:
            raise StoreError(f"stored ledger head is corrupt: {exc}") from None
        levels: list[bytearray] = []
        async for key, value in kv.scan(b"m/"):
            level, page = _PAGE_KEY.unpack(key[2:])
            while len(levels) <= level:
                levels.append(bytearray())
            if len(levels[level]) != page * PAGE_HASHES * 32:
                raise StoreError(f"stored Merkle level {level} is missing page(s) before {page}")
            levels[level] += value
        tree = MerkleTree.from_levels([bytes(level) for level in levels])
        store = LogStore(kv, None)  # type: ignore[arg-type]
        genesis = await store._load_block(0)
        head_block = await store._load_block(int(head["height"]))
        if genesis is None or head_block is None:
            raise StoreError("stored ledger is missing its genesis or head block")
        validators = ValidatorSet({k: PublicKey.from_hex(v) for k, v in members.items()})
        return Ledger.restore(
            genesis=genesis.block, head=head_block.block, validators=validators, tree=tree
        )

    # -- writing -------------------------------------------------------------------

    async def append(
        self,
        committed: CommittedBlock,
        *,
        now: float | None = None,
        validated: Callable[[], list[bytes]] | None = None,
    ) -> None:
        """Validate ``committed`` against the head and persist it atomically.

        ``validated`` lets a runtime do the (CPU-heavy) validation elsewhere, e.g. in a
        worker thread: it must return :meth:`Ledger.validate`'s result for this block
        against the current head; it is called here, after nothing else changed it.
        """
        leaves = self.ledger.validate(committed, now=now) if validated is None else validated()
        first = self.ledger.tree.size
        # Adopt in memory first so the Merkle pages to write are known. The batch is
        # atomic: if it fails, the store still holds the old head, and we reload it.
        self.ledger.adopt(committed.block, leaves)
        try:
            await self._write_block(committed, first=first, leaves_from=first)
        except BaseException:
            verifier = self.ledger.record_verifier
            self.ledger = await self._reload(self.kv)
            self.ledger.record_verifier = verifier
            raise

    async def _write_block(
        self, committed: CommittedBlock, *, first: int, leaves_from: int
    ) -> None:
        block = committed.block
        tree = self.ledger.tree
        async with self.kv.batch() as batch:
            header = block.header()
            batch.put(
                _block_key(block.height),
                canonical_json(
                    {
                        "header": header,
                        "certificate": committed.certificate.to_text(),
                        "first": first,
                    }
                ),
            )
            height = _u64(block.height)
            for offset, sr in enumerate(block.records):
                index = first + offset
                r = sr.record
                batch.put(_record_key(index), height + sr.to_bytes())
                batch.put(_package_prefix(r.package_type, r.package_specific_id) + _u64(index), b"")
                batch.put(_artifact_prefix(r.artifact_hash) + _u64(index), b"")
            for level, page in sorted(tree.dirty_pages()):
                batch.put(b"m/" + _PAGE_KEY.pack(level, page), tree.page(level, page))
            batch.put(VALIDATORS, canonical_json(self.ledger.validators.to_json()))
            batch.put(
                HEAD,
                canonical_json(
                    {"height": block.height, "hash": block.hash, "tree_size": block.tree_size}
                ),
            )
        tree.clear_dirty()

    # -- reading -------------------------------------------------------------------

    async def record(self, index: int) -> StoredRecord | None:
        raw = await self.kv.get(_record_key(index))
        if raw is None:
            return None
        return StoredRecord(index, _U64.unpack(raw[:8])[0], SignedRecord.from_bytes(raw[8:]))

    async def _records(self, prefix: bytes) -> list[StoredRecord]:
        out: list[StoredRecord] = []
        async for key, _ in self.kv.scan(prefix):
            rec = await self.record(_U64.unpack(key[-8:])[0])
            if rec is not None:
                out.append(rec)
        return out

    async def records_for_package(self, package_type: str, package_id: str) -> list[StoredRecord]:
        """Every record of a package, oldest first."""
        return await self._records(_package_prefix(package_type, package_id))

    async def records_for_artifact(self, artifact_hash: str) -> list[StoredRecord]:
        """Every record naming ``artifact_hash`` (bare hex), oldest first."""
        return await self._records(_artifact_prefix(artifact_hash))

    async def iter_records(self, start: int = 0) -> AsyncIterator[StoredRecord]:
        async for key, raw in self.kv.scan(b"r/", start=_record_key(start)):
            yield StoredRecord(
                _U64.unpack(key[2:])[0], _U64.unpack(raw[:8])[0], SignedRecord.from_bytes(raw[8:])
            )

    async def _load_block(self, height: int) -> CommittedBlock | None:
        raw = await self.kv.get(_block_key(height))
        if raw is None:
            return None
        data: Any = canonical_loads(raw)
        header = dict(data["header"])
        first = int(data["first"])
        count = int(header["num_records"])
        records = []
        async for _key, raw_record in self.kv.scan(b"r/", start=_record_key(first), limit=count):
            records.append(SignedRecord.from_bytes(raw_record[8:]).to_json())
        if len(records) != count:
            raise StoreError(f"stored block {height} is missing records")
        header["records"] = records
        return CommittedBlock(Block.from_json(header), SignedNote.parse(data["certificate"]))

    async def block(self, height: int) -> CommittedBlock | None:
        return await self._load_block(height)

    async def block_json(self, height: int) -> dict[str, Any] | None:
        """A stored committed block as JSON, without re-validating it (for serving peers,
        who validate it themselves)."""
        raw = await self.kv.get(_block_key(height))
        if raw is None:
            return None
        data: Any = canonical_loads(raw)
        header = dict(data["header"])
        first, count = int(data["first"]), int(header["num_records"])
        records = []
        async for _key, raw_record in self.kv.scan(b"r/", start=_record_key(first), limit=count):
            records.append(canonical_loads(raw_record[8:]))
        if len(records) != count:
            raise StoreError(f"stored block {height} is missing records")
        header["records"] = records
        return {"block": header, "certificate": data["certificate"]}

    async def blocks_bytes(self, start: int, end: int, max_bytes: int) -> tuple[bytes, int]:
        """Stored blocks ``start..end-1`` as one JSON array of committed blocks, and their
        count: at least one block (if any is in range), then more while under
        ``max_bytes``. Built from the stored bytes without decoding any record, for
        serving peers, who decode and validate every block themselves."""
        parts: list[bytes] = []
        size = 0
        for height in range(max(0, start), min(end, self.ledger.height + 1)):
            raw = await self.kv.get(_block_key(height))
            if raw is None:
                break
            data: Any = canonical_loads(raw)
            first, count = int(data["first"]), int(data["header"]["num_records"])
            records = [
                raw_record[8:]
                async for _key, raw_record in self.kv.scan(
                    b"r/", start=_record_key(first), limit=count
                )
            ]
            if len(records) != count:
                raise StoreError(f"stored block {height} is missing records")
            header = canonical_json(data["header"])
            item = b"".join((
                b'{"block":', header[:-1], b',"records":[', b",".join(records), b"]},",
                b'"certificate":', canonical_json(data["certificate"]), b"}",
            ))
            if parts and size + len(item) > max_bytes:
                break
            parts.append(item)
            size += len(item) + 1
        return b"[" + b",".join(parts) + b"]", len(parts)

    async def blocks(self, start: int, end: int) -> list[CommittedBlock]:
        """Committed blocks ``start..end-1`` (clipped to the head)."""
        out = []
        for h in range(max(0, start), min(end, self.ledger.height + 1)):
            b = await self._load_block(h)
            if b is not None:
                out.append(b)
        return out

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        return self.ledger.tree.inclusion_proof(index, size)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        return self.ledger.tree.consistency_proof(old_size, new_size)

    async def set_certificate(self, height: int, certificate: SignedNote) -> None:
        """Replace the stored certificate of block ``height`` by one with the same text
        (the same checkpoint) and more signature lines: witness cosignatures."""
        raw = await self.kv.get(_block_key(height))
        if raw is None:
            raise StoreError(f"no stored block {height}")
        data: Any = canonical_loads(raw)
        if SignedNote.parse(data["certificate"]).text != certificate.text:
            raise StoreError(f"the new certificate of block {height} signs another checkpoint")
        data["certificate"] = certificate.to_text()
        await self.kv.put(_block_key(height), canonical_json(data))

    async def certificate(self, height: int) -> SignedNote | None:
        raw = await self.kv.get(_block_key(height))
        if raw is None:
            return None
        return SignedNote.parse(canonical_loads(raw)["certificate"])

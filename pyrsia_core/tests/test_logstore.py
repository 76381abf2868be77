"""The ledger persists through a KeyValueStore and reloads without rehashing."""

from __future__ import annotations

import pytest
from core_helpers import artifact_records, commit, genesis, signer
from pyrsia_core.errors import BlockError, StoreError
from pyrsia_core.testing import MemoryKeyValueStore

from pyrsia_core import LogStore, leaf_hash, verify_inclusion

pytestmark = pytest.mark.anyio


async def test_append_reload_and_query() -> None:
    vals = [signer(1)]
    kv = MemoryKeyValueStore()
    g = genesis(vals)
    store = await LogStore.open(kv, g)
    for i in range(5):
        records = artifact_records(vals[0], 3, package=f"img:{i}")
        await store.append(commit(store.ledger, records, vals, timestamp=1_700_000_100 + i))
    assert store.ledger.height == 5 and store.ledger.tree.size == 16

    again = await LogStore.open(kv)
    assert again.ledger.head_hash == store.ledger.head_hash
    assert again.ledger.tree.root() == store.ledger.tree.root()
    assert again.ledger.validators == store.ledger.validators

    found = await again.records_for_package("Docker", "img:3")
    assert [r.index for r in found] == [10, 11, 12] and {r.height for r in found} == {4}
    by_hash = await again.records_for_artifact(found[0].signed.record.artifact_hash)
    assert len(by_hash) == 5  # the same artifact hash is in every image here
    proof = again.inclusion_proof(11)
    verify_inclusion(
        leaf_hash(found[1].signed.record.canonical()), 11, 16, proof, again.ledger.tree.root()
    )
    blocks = await again.blocks(0, 100)
    assert [b.block.height for b in blocks] == list(range(6))
    assert blocks[3].block.hash == (await again.block(3)).block.hash  # type: ignore[union-attr]
    assert [r.index async for r in again.iter_records(14)] == [14, 15]


async def test_bad_block_changes_nothing() -> None:
    vals = [signer(1)]
    kv = MemoryKeyValueStore()
    store = await LogStore.open(kv, genesis(vals))
    good = commit(store.ledger, artifact_records(vals[0], 2), vals)
    bad = commit(store.ledger, artifact_records(signer(7), 2), vals)
    with pytest.raises(BlockError):
        await store.append(bad)
    assert store.ledger.height == 0
    await store.append(good)
    assert (await LogStore.open(kv)).ledger.height == 1


async def test_other_network_and_empty_store() -> None:
    kv = MemoryKeyValueStore()
    await LogStore.open(kv, genesis([signer(1)]))
    with pytest.raises(BlockError):
        await LogStore.open(kv, genesis([signer(2)]))
    with pytest.raises(StoreError):
        await LogStore.open(MemoryKeyValueStore())


async def test_reload_across_merkle_pages() -> None:
    vals = [signer(1)]
    kv = MemoryKeyValueStore()
    store = await LogStore.open(kv, genesis(vals))
    for i in range(3):
        await store.append(
            commit(store.ledger, artifact_records(vals[0], 1500), vals, timestamp=1_700_000_100 + i)
        )
    again = await LogStore.open(kv)
    assert again.ledger.tree.size == 4501
    assert again.ledger.tree.root() == store.ledger.tree.root()
    assert again.inclusion_proof(4000) == store.inclusion_proof(4000)


async def test_block_json_is_the_committed_block() -> None:
    from pyrsia_core import canonical_json

    vals = [signer(1)]
    store = await LogStore.open(MemoryKeyValueStore(), genesis(vals))
    await store.append(commit(store.ledger, artifact_records(vals[0], 3), vals))
    for height in (0, 1):
        full = await store.block(height)
        assert full is not None
        assert canonical_json(await store.block_json(height)) == canonical_json(full.to_json())
    assert await store.block_json(2) is None


async def test_blocks_bytes_are_the_committed_blocks() -> None:
    import json

    from pyrsia_core import CommittedBlock, canonical_json

    vals = [signer(1)]
    store = await LogStore.open(MemoryKeyValueStore(), genesis(vals))
    for n in (3, 5, 7):
        await store.append(commit(store.ledger, artifact_records(vals[0], n), vals))
    blob, count = await store.blocks_bytes(0, 10, max_bytes=1 << 20)
    assert count == 4
    decoded = [CommittedBlock.from_json(item) for item in json.loads(blob)]
    for height, block in enumerate(decoded):
        full = await store.block(height)
        assert full is not None and block.to_bytes() == full.to_bytes()
    # The size cap stops after the first block that would cross it, but always sends one.
    one, count = await store.blocks_bytes(1, 10, max_bytes=10)
    assert count == 1 and [b["block"]["height"] for b in json.loads(one)] == [1]
    two, count = await store.blocks_bytes(2, 4, max_bytes=1 << 20)
    assert count == 2 and canonical_json(json.loads(two)[1]) == (await store.block(3)).to_bytes()  # type: ignore[union-attr]
    assert await store.blocks_bytes(4, 10, max_bytes=1 << 20) == (b"[]", 0)

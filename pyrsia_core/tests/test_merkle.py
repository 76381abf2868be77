"""Tests for the RFC 9162 Merkle tree, against an independent reference.

The reference below is written from the RFC 9162 text alone, on lists of leaf
*data*: MTH (§2.1.1), PATH (§2.1.3.1), PROOF/SUBPROOF (§2.1.4.1) and the two
verification algorithms (§2.1.3.2, §2.1.4.2) as step lists, returning bools.
It shares no code with ``pyrsia_core._merkle``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrsia_core._merkle import (
    EMPTY_ROOT,
    PAGE_HASHES,
    MerkleTree,
    leaf_hash,
    node_hash,
    root_from_inclusion,
    verify_consistency,
    verify_inclusion,
)
from pyrsia_core.errors import ProofError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------
# Reference implementation (RFC 9162 §2.1, verbatim definitions)
# --------------------------------------------------------------------------


def HASH(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def k_of(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def MTH(d: Sequence[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return HASH(b"")
    if n == 1:
        return HASH(b"\x00" + d[0])
    k = k_of(n)
    return HASH(b"\x01" + MTH(d[:k]) + MTH(d[k:]))


def PATH(m: int, d: Sequence[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = k_of(n)
    if m < k:
        return [*PATH(m, d[:k]), MTH(d[k:])]
    return [*PATH(m - k, d[k:]), MTH(d[:k])]


def SUBPROOF(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [MTH(d)]
    k = k_of(n)
    if m <= k:
        return [*SUBPROOF(m, d[:k], b), MTH(d[k:])]
    return [*SUBPROOF(m - k, d[k:], False), MTH(d[:k])]


def PROOF(m: int, d: Sequence[bytes]) -> list[bytes]:
    return SUBPROOF(m, d, True)


def lsb(x: int) -> bool:
    return x % 2 == 1


def ref_verify_inclusion(
    hash_: bytes, leaf_index: int, tree_size: int, inclusion_path: list[bytes], root_hash: bytes
) -> bool:
    """RFC 9162 §2.1.3.2, step by step."""
    if any(len(p) != 32 for p in inclusion_path) or len(hash_) != 32:
        return False
    if leaf_index >= tree_size or leaf_index < 0:  # 1
        return False
    fn, sn = leaf_index, tree_size - 1  # 2
    r = hash_  # 3
    for p in inclusion_path:  # 4
        if sn == 0:  # a
            return False
        if lsb(fn) or fn == sn:  # b
            r = HASH(b"\x01" + p + r)
            if not lsb(fn):
                while not (lsb(fn) or fn == 0):
                    fn //= 2
                    sn //= 2
        else:
            r = HASH(b"\x01" + r + p)
        fn //= 2  # c
        sn //= 2
    return sn == 0 and r == root_hash  # 5


def ref_verify_consistency(
    first: int, second: int, first_hash: bytes, second_hash: bytes, consistency_path: list[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2 for 0 < first < second; trivial cases as the RFC implies."""
    if any(len(p) != 32 for p in consistency_path):
        return False
    if first == second:
        return consistency_path == [] and first_hash == second_hash
    if first == 0:
        return consistency_path == [] and first_hash == HASH(b"")
    if not 0 < first < second:
        return False
    if not consistency_path:  # 1
        return False
    path = list(consistency_path)
    if first & (first - 1) == 0:  # 2
        path = [first_hash, *path]
    fn, sn = first - 1, second - 1  # 3
    while lsb(fn):  # 4
        fn //= 2
        sn //= 2
    fr = sr = path[0]  # 5
    for c in path[1:]:  # 6
        if sn == 0:  # a
            return False
        if lsb(fn) or fn == sn:  # b
            fr = HASH(b"\x01" + c + fr)
            sr = HASH(b"\x01" + c + sr)
            if not lsb(fn):
                while not (lsb(fn) or fn == 0):
                    fn //= 2
                    sn //= 2
        else:
            sr = HASH(b"\x01" + sr + c)
        fn //= 2  # c
        sn //= 2
    return fr == first_hash and sr == second_hash and sn == 0  # 7


# --------------------------------------------------------------------------
# Shared data: one big tree, and the reference on the same leaf data
# --------------------------------------------------------------------------

MAX_N = 2049
DATA = [b"leaf-%d" % i for i in range(MAX_N + 1)]
LEAVES = [HASH(b"\x00" + d) for d in DATA]
BIG = MerkleTree.from_leaves(LEAVES)

POWER_SIZES = sorted(
    {1} | {s for e in range(12) for s in (2**e - 1, 2**e, 2**e + 1) if 1 <= s <= MAX_N}
)


@st.composite
def size_and_index(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(st.integers(1, 2000))
    return n, draw(st.integers(0, n - 1))


@st.composite
def old_and_new(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(st.integers(1, 2000))
    return draw(st.integers(0, n)), n


def flip(h: bytes, pos: int) -> bytes:
    return h[:pos] + bytes([h[pos] ^ 0x01]) + h[pos + 1 :]


# --------------------------------------------------------------------------
# Known answers (RFC 6962 / Certificate Transparency test vectors)
# --------------------------------------------------------------------------

CT_DATA = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243",
                                         "5051525354555657",
                                         "606162636465666768696a6b6c6d6e6f")]  # fmt: skip
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_known_answers() -> None:
    tree = MerkleTree.from_leaves(leaf_hash(d) for d in CT_DATA)
    assert EMPTY_ROOT.hex() == CT_ROOTS[0]
    assert [tree.root(n).hex() for n in range(9)] == CT_ROOTS
    assert [h.hex() for h in tree.inclusion_proof(0, 8)] == [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]
    assert [h.hex() for h in tree.inclusion_proof(5, 8)] == [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ]
    assert [h.hex() for h in tree.consistency_proof(2, 5)] == [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ]


def test_hash_functions() -> None:
    assert leaf_hash(b"abc") == HASH(b"\x00abc")
    assert node_hash(b"l" * 32, b"r" * 32) == HASH(b"\x01" + b"l" * 32 + b"r" * 32)
    assert EMPTY_ROOT == HASH(b"")
    assert MerkleTree().root() == EMPTY_ROOT
    assert MerkleTree().size == 0


# --------------------------------------------------------------------------
# Differential properties against the reference
# --------------------------------------------------------------------------


def check_root(n: int) -> None:
    expected = MTH(DATA[:n])
    assert BIG.root(n) == expected
    assert MerkleTree.from_leaves(LEAVES[:n]).root() == expected


def check_inclusion(n: int, i: int) -> None:
    ours = BIG.inclusion_proof(i, n)
    reference = PATH(i, DATA[:n])
    assert ours == reference
    root = MTH(DATA[:n])
    assert ref_verify_inclusion(LEAVES[i], i, n, ours, root)
    verify_inclusion(LEAVES[i], i, n, ours, root)
    verify_inclusion(LEAVES[i], i, n, reference, root)
    assert root_from_inclusion(LEAVES[i], i, n, reference) == root


def check_consistency(m: int, n: int) -> None:
    ours = BIG.consistency_proof(m, n)
    reference = PROOF(m, DATA[:n]) if 0 < m < n else []
    assert ours == reference
    old_root, new_root = MTH(DATA[:m]), MTH(DATA[:n])
    assert ref_verify_consistency(m, n, old_root, new_root, ours)
    verify_consistency(m, n, old_root, new_root, ours)
    verify_consistency(m, n, old_root, new_root, reference)


@SETTINGS
@given(st.integers(1, 2000))
def test_root_matches_reference(n: int) -> None:
    check_root(n)


@SETTINGS
@given(size_and_index())
def test_inclusion_matches_reference(case: tuple[int, int]) -> None:
    check_inclusion(*case)


@SETTINGS
@given(old_and_new())
def test_consistency_matches_reference(case: tuple[int, int]) -> None:
    check_consistency(*case)


@pytest.mark.parametrize("n", POWER_SIZES)
def test_edge_sizes(n: int) -> None:
    check_root(n)
    for i in sorted({0, 1, n // 2, n - 2, n - 1} & set(range(n))):
        check_inclusion(n, i)
    olds = {0, 1, n // 2, n - 1, n} | {2**e for e in range(12) if 2**e <= n}
    for m in sorted(olds & set(range(n + 1))):
        check_consistency(m, n)


def test_tree_of_size_one() -> None:
    tree = MerkleTree.from_leaves([LEAVES[0]])
    assert tree.root() == LEAVES[0]
    assert tree.inclusion_proof(0) == []
    verify_inclusion(LEAVES[0], 0, 1, [], LEAVES[0])
    assert tree.consistency_proof(1) == []
    assert tree.consistency_proof(0) == []
    verify_consistency(1, 1, LEAVES[0], LEAVES[0], [])
    verify_consistency(0, 1, EMPTY_ROOT, LEAVES[0], [])
    with pytest.raises(ProofError):
        verify_inclusion(LEAVES[0], 0, 1, [LEAVES[1]], LEAVES[0])


def test_small_trees_exhaustively() -> None:
    for n in range(1, 40):
        for i in range(n):
            check_inclusion(n, i)
        for m in range(n + 1):
            check_consistency(m, n)


def test_append_equals_extend() -> None:
    one = MerkleTree()
    for i, h in enumerate(LEAVES[:300]):
        assert one.append(h) == i
        assert one.size == i + 1
    two = MerkleTree()
    two.extend(LEAVES[:7])
    two.extend([])
    two.extend(iter(LEAVES[7:300]))
    assert one.levels == two.levels == MerkleTree.from_leaves(LEAVES[:300]).levels
    assert [one.leaf(i) for i in range(300)] == LEAVES[:300]


# --------------------------------------------------------------------------
# Tampering: always ProofError, never anything else, and agreeing with the reference
# --------------------------------------------------------------------------


def expect_inclusion_rejected(h: bytes, i: int, n: int, proof: list[bytes], root: bytes) -> None:
    assert not ref_verify_inclusion(h, i, n, proof, root)
    with pytest.raises(ProofError):
        verify_inclusion(h, i, n, proof, root)


def expect_inclusion_agrees(h: bytes, i: int, n: int, proof: list[bytes], root: bytes) -> None:
    if ref_verify_inclusion(h, i, n, proof, root):
        verify_inclusion(h, i, n, proof, root)
    else:
        with pytest.raises(ProofError):
            verify_inclusion(h, i, n, proof, root)


@SETTINGS
@given(size_and_index(), st.data())
def test_tampered_inclusion_proofs_are_rejected(case: tuple[int, int], data: st.DataObject) -> None:
    n, i = case
    proof = BIG.inclusion_proof(i, n)
    root = BIG.root(n)
    h = LEAVES[i]
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1))
        pos = data.draw(st.integers(0, 31))
        expect_inclusion_rejected(h, i, n, [*proof[:k], flip(proof[k], pos), *proof[k + 1 :]], root)
        expect_inclusion_rejected(h, i, n, proof[:k] + proof[k + 1 :], root)  # drop
    extra = data.draw(st.binary(min_size=32, max_size=32))
    at = data.draw(st.integers(0, len(proof)))
    expect_inclusion_rejected(h, i, n, [*proof[:at], extra, *proof[at:]], root)  # add
    expect_inclusion_rejected(h, i, n, proof, flip(root, data.draw(st.integers(0, 31))))
    expect_inclusion_rejected(flip(h, 0), i, n, proof, root)  # wrong leaf
    other = data.draw(st.integers(0, max(n - 1, 0)).filter(lambda j: j != i)) if n > 1 else None
    if other is not None:
        expect_inclusion_rejected(h, other, n, proof, root)  # wrong index
    expect_inclusion_rejected(h, n, n, proof, root)  # index == size
    wrong_n = data.draw(st.integers(i + 1, MAX_N).filter(lambda s: s != n))
    # Against the root of the claimed size the proof never verifies ...
    expect_inclusion_rejected(h, i, wrong_n, proof, BIG.root(wrong_n))
    # ... and against the true root we reject exactly when RFC 9162 does (an
    # inclusion proof binds the size only through the path shape and the root).
    expect_inclusion_agrees(h, i, wrong_n, proof, root)


def expect_consistency_rejected(m: int, n: int, old: bytes, new: bytes, proof: list[bytes]) -> None:
    assert not ref_verify_consistency(m, n, old, new, proof)
    with pytest.raises(ProofError):
        verify_consistency(m, n, old, new, proof)


def expect_consistency_agrees(m: int, n: int, old: bytes, new: bytes, proof: list[bytes]) -> None:
    if ref_verify_consistency(m, n, old, new, proof):
        verify_consistency(m, n, old, new, proof)
    else:
        with pytest.raises(ProofError):
            verify_consistency(m, n, old, new, proof)


@SETTINGS
@given(old_and_new(), st.data())
def test_tampered_consistency_proofs_are_rejected(
    case: tuple[int, int], data: st.DataObject
) -> None:
    m, n = case
    proof = BIG.consistency_proof(m, n)
    old, new = BIG.root(m), BIG.root(n)
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1))
        pos = data.draw(st.integers(0, 31))
        expect_consistency_rejected(
            m, n, old, new, [*proof[:k], flip(proof[k], pos), *proof[k + 1 :]]
        )
        expect_consistency_rejected(m, n, old, new, proof[:k] + proof[k + 1 :])
    extra = data.draw(st.binary(min_size=32, max_size=32))
    at = data.draw(st.integers(0, len(proof)))
    expect_consistency_rejected(m, n, old, new, [*proof[:at], extra, *proof[at:]])
    pos = data.draw(st.integers(0, 31))
    expect_consistency_rejected(m, n, flip(old, pos), new, proof)
    if m > 0:  # (nothing about the new root is proven from size 0)
        expect_consistency_rejected(m, n, old, flip(new, pos), proof)
    if m < n:
        expect_consistency_rejected(n, m, new, old, proof)  # swapped sizes
    # Wrong sizes, with the roots of the sizes claimed and with the true roots.
    wm = data.draw(st.integers(0, n).filter(lambda s: s != m))
    wn = data.draw(st.integers(m, MAX_N).filter(lambda s: s != n))
    expect_consistency_agrees(wm, n, BIG.root(wm), new, proof)
    expect_consistency_agrees(m, wn, old, BIG.root(wn), proof)
    expect_consistency_agrees(wm, n, old, new, proof)
    expect_consistency_agrees(m, wn, old, new, proof)


def test_malformed_inclusion_inputs_raise_proof_error() -> None:
    leaf, p, root = LEAVES[0], LEAVES[1], BIG.root(2)
    bad: list[tuple[object, ...]] = [
        (leaf[:31], 0, 2, [p], root),
        (leaf, 0, 2, [p[:31]], root),
        (leaf, 0, 2, [p + b"\x00"], root),
        (leaf, 0, 2, ["x" * 32], root),
        (leaf, 0, 2, p, root),  # bytes, not a sequence of hashes
        (leaf, 0, 2, "x" * 32, root),
        (leaf, 0, 2, None, root),
        (leaf, -1, 2, [p], root),
        (leaf, 0, -2, [p], root),
        (leaf, 0, 0, [], EMPTY_ROOT),
        (leaf, 2, 2, [p], root),
        (leaf, True, 2, [p], root),
        (leaf, 0, 2**64, [p], root),
        (leaf, 0, 2, [p] * 65, root),
        (leaf, 0, 2, [p], root[:31]),
        (leaf, 0, 2, [p], None),
        (None, 0, 2, [p], root),
    ]
    for args in bad:
        with pytest.raises(ProofError):
            verify_inclusion(*args)  # type: ignore[arg-type]
    verify_inclusion(leaf, 0, 2, [p], root)
    verify_inclusion(bytearray(leaf), 0, 2, (bytearray(p),), bytearray(root))  # type: ignore[arg-type]


def test_malformed_consistency_inputs_raise_proof_error() -> None:
    proof = BIG.consistency_proof(3, 7)
    r3, r7 = BIG.root(3), BIG.root(7)
    bad: list[tuple[object, ...]] = [
        (3, 7, r3[:31], r7, proof),
        (3, 7, r3, r7 + b"\x00", proof),
        (3, 7, r3, r7, [*proof[:-1], proof[-1][:31]]),
        (3, 7, r3, r7, [*proof[:-1], "x" * 32]),
        (3, 7, r3, r7, b"".join(proof)),
        (3, 7, r3, r7, []),
        (7, 3, r7, r3, proof),
        (-1, 7, r3, r7, proof),
        (3, 2**64, r3, r7, proof),
        (3, 7, r3, r7, [r3] * 66),
        (3, 7, r3, r7, None),
        (3.0, 7, r3, r7, proof),
        (3, 3, r3, r7, []),  # equal sizes, different roots
        (3, 3, r3, r3, [r3]),  # equal sizes, non-empty proof
        (0, 7, r3, r7, []),  # size 0 needs the empty root
        (0, 7, EMPTY_ROOT, r7, [r3]),  # and an empty proof
        (0, 0, r3, r3, []),
    ]
    for args in bad:
        with pytest.raises(ProofError):
            verify_consistency(*args)  # type: ignore[arg-type]
    verify_consistency(3, 7, r3, r7, proof)
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 7, EMPTY_ROOT, r7, [])
    verify_consistency(7, 7, r7, r7, [])


# --------------------------------------------------------------------------
# Bad arguments to the tree raise ValueError
# --------------------------------------------------------------------------


def test_bad_arguments_raise_value_error() -> None:
    tree = MerkleTree.from_leaves(LEAVES[:10])
    calls: list[Callable[[], object]] = [
        lambda: tree.inclusion_proof(10),
        lambda: tree.inclusion_proof(-1),
        lambda: tree.inclusion_proof(3, 3),
        lambda: tree.inclusion_proof(0, 11),
        lambda: tree.inclusion_proof(0, 0),
        lambda: MerkleTree().inclusion_proof(0),
        lambda: tree.consistency_proof(5, 4),
        lambda: tree.consistency_proof(11),
        lambda: tree.consistency_proof(2, 11),
        lambda: tree.consistency_proof(-1),
        lambda: tree.root(11),
        lambda: tree.root(-1),
        lambda: tree.leaf(10),
        lambda: tree.leaf(-1),
        lambda: tree.append(b"\x00" * 31),
        lambda: tree.append("x" * 32),  # type: ignore[arg-type]
        lambda: tree.extend([LEAVES[0], b"short"]),
        lambda: tree.page(0, 1),
        lambda: tree.page(4, 0),
        lambda: tree.page(-1, 0),
        lambda: tree.inclusion_proof(1.0),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert not isinstance(info.value, ProofError)
    assert tree.size == 10  # the failed extend appended nothing
    assert tree.root() == MTH(DATA[:10])


# --------------------------------------------------------------------------
# Persistence: from_levels and dirty pages
# --------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 2000), st.data())
def test_from_levels_round_trips(n: int, data: st.DataObject) -> None:
    tree = MerkleTree.from_leaves(LEAVES[:n])
    restored = MerkleTree.from_levels([bytes(level) for level in tree.levels])
    assert restored.levels == tree.levels
    assert restored.size == n
    assert restored.dirty_pages() == set()
    assert restored.root() == tree.root() == MTH(DATA[:n])
    if n:
        i = data.draw(st.integers(0, n - 1))
        m = data.draw(st.integers(0, n))
        assert restored.inclusion_proof(i) == tree.inclusion_proof(i)
        assert restored.consistency_proof(m) == tree.consistency_proof(m)
    # A restored tree keeps growing exactly like the original.
    restored.extend(LEAVES[n : n + 5])
    assert restored.root() == MTH(DATA[: n + 5])


def test_from_levels_validates_shape() -> None:
    levels = [bytes(level) for level in MerkleTree.from_leaves(LEAVES[:13]).levels]
    assert [len(level) // 32 for level in levels] == [13, 6, 3, 1]
    assert MerkleTree.from_levels([]).size == 0
    assert MerkleTree.from_levels([b""]).size == 0
    assert MerkleTree.from_levels([*levels, b"", b""]).levels == [bytearray(x) for x in levels]
    bad = [
        [levels[0][:-1], *levels[1:]],  # not whole hashes
        [levels[0] + LEAVES[0] * 2, *levels[1:]],  # level 1 too short for level 0
        [levels[0], levels[1] + LEAVES[0], *levels[2:]],  # level 1 too long
        levels[:3],  # top level missing
        [levels[0], b"", levels[2], levels[3]],
        [b"", levels[1]],
    ]
    for shape in bad:
        with pytest.raises(ValueError):
            MerkleTree.from_levels(shape)


def pages_of(tree: MerkleTree) -> dict[tuple[int, int], bytes]:
    return {
        (level, page): tree.page(level, page)
        for level in range(len(tree.levels))
        for page in range(tree.page_count(level))
    }


def check_dirty_tracking(tree: MerkleTree, grow: list[int]) -> None:
    """After each growth step, the dirty set is exactly the set of changed pages."""
    for step in grow:
        tree.clear_dirty()
        assert tree.dirty_pages() == set()
        before = pages_of(tree)
        start = tree.size
        if step < 0:
            tree.append(LEAVES[start % len(LEAVES)])
        else:
            tree.extend(LEAVES[(start + j) % len(LEAVES)] for j in range(step))
        after = pages_of(tree)
        changed = {key for key, value in after.items() if before.get(key) != value}
        assert tree.dirty_pages() == changed
        # Rebuilding from the pages gives the same tree.
        levels = [
            b"".join(after[(level, p)] for p in range(tree.page_count(level)))
            for level in range(len(tree.levels))
        ]
        assert MerkleTree.from_levels(levels).levels == tree.levels


def test_dirty_pages_across_page_boundaries() -> None:
    tree = MerkleTree()
    check_dirty_tracking(
        tree, [-1, 1, PAGE_HASHES - 3, -1, -1, -1, -1, 5, PAGE_HASHES * 2 + 7, 3 * PAGE_HASHES]
    )
    assert tree.size > 6 * PAGE_HASHES
    assert (
        tree.root()
        == MerkleTree.from_leaves(LEAVES[i % len(LEAVES)] for i in range(tree.size)).root()
    )
    assert tree.page_count(0) == -(-tree.size // PAGE_HASHES)
    assert (
        len(tree.page(0, tree.page_count(0) - 1)) == (tree.size % PAGE_HASHES or PAGE_HASHES) * 32
    )


@settings(max_examples=15, deadline=None)
@given(
    st.integers(0, 3 * PAGE_HASHES),
    st.lists(st.one_of(st.just(-1), st.integers(0, 1500)), min_size=1, max_size=4),
)
def test_dirty_pages_property(initial: int, grow: list[int]) -> None:
    tree = MerkleTree.from_leaves(LEAVES[i % len(LEAVES)] for i in range(initial))
    assert {(0, p) for p in range(tree.page_count(0))} <= tree.dirty_pages()
    check_dirty_tracking(tree, grow)


def test_proof_cost_is_logarithmic() -> None:
    """Proofs touch O(log n) stored nodes: count node reads on a 2**16+ leaf tree."""
    tree = MerkleTree.from_leaves(LEAVES[i % len(LEAVES)] for i in range(70_001))
    reads = 0
    original = MerkleTree._node

    def counting(self: MerkleTree, level: int, index: int) -> bytes:
        nonlocal reads
        reads += 1
        return original(self, level, index)

    MerkleTree._node = counting  # type: ignore[method-assign]
    try:
        for index in (0, 35_000, 70_000):
            reads = 0
            tree.inclusion_proof(index)
            assert reads <= 2 * 17
            reads = 0
            tree.consistency_proof(index + 1)
            assert reads <= 3 * 17
        reads = 0
        tree.root()
        assert reads <= 17
    finally:
        MerkleTree._node = original  # type: ignore[method-assign]

"""RFC 9162 §2.1 Merkle tree: an append-only tree, its proofs and their verifiers.

Hashes follow RFC 9162 §2.1.1 with SHA-256::

    MTH({})   = SHA-256()
    leaf hash = SHA-256(0x00 || d)
    node hash = SHA-256(0x01 || left || right)

:class:`MerkleTree` keeps the hash of every *complete* subtree in memory, one
``bytearray`` per level (level ``k`` holds, left to right, the 32-byte hashes of
the complete subtrees of ``2**k`` leaves). Every node that RFC 9162's
recursive definitions ask for is either one of those stored hashes or the hash
of a right-edge range built from at most ``log2(n)`` of them, so roots and
proofs cost O(log n) lookups and never rehash the tree.

Proofs are exactly RFC 9162 §2.1.3.1 ``PATH`` and §2.1.4.1 ``PROOF``; the
verifiers are exactly §2.1.3.2 and §2.1.4.2 and fail closed: they return
``None`` or raise :class:`~pyrsia_core.errors.ProofError`, for any malformed
input as well as for a proof that does not verify. Bad arguments to the tree's
own methods (an index past the end, say) raise plain :class:`ValueError`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import Final

import attrs

from .errors import ProofError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MAX_TREE_SIZE",
    "PAGE_HASHES",
    "MerkleTree",
    "leaf_hash",
    "node_hash",
    "root_from_inclusion",
    "verify_consistency",
    "verify_inclusion",
]

#: Size in bytes of every hash in the tree (SHA-256).
HASH_SIZE: Final = 32
#: Number of hashes in one persistence page of a level (see :meth:`MerkleTree.page`).
PAGE_HASHES: Final = 1024
#: RFC 9162 tree sizes and leaf indices are uint64.
MAX_TREE_SIZE: Final = 2**64 - 1
#: MTH of the empty tree: SHA-256 of the empty string.
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()

_PAGE_BYTES: Final = PAGE_HASHES * HASH_SIZE
#: Longest inclusion proof for a tree of at most MAX_TREE_SIZE leaves.
_MAX_INCLUSION_PROOF: Final = 64
#: Longest consistency proof (RFC 9162 §2.1.4.1: at most ceil(log2(n)) + 1 nodes).
_MAX_CONSISTENCY_PROOF: Final = 65
_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"
_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 || data)."""
    h = _sha256(_LEAF_PREFIX)
    h.update(data)
    return h.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right)."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_argument(name: str, value: object, maximum: int, context: str = "") -> int:
    """Validate a caller-supplied size or index: an int in ``[0, maximum]``."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    assert isinstance(value, int)
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    if value > maximum:
        raise ValueError(f"{name} {value} is larger than {maximum}")
    return value


def _check_index(value: object, size: int) -> int:
    if not _is_int(value):
        raise ValueError(f"index must be an int, got {type(value).__name__}")
    assert isinstance(value, int)
    if not 0 <= value < size:
        raise ValueError(f"index {value} is out of range for a tree of size {size}")
    return value


def _check_leaf_hash(value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != HASH_SIZE:
        raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, got {value!r:.80}")
    return bytes(value)


@attrs.define(eq=False)
class MerkleTree:
    """An append-only RFC 9162 Merkle tree holding every complete-subtree hash.

    ``levels[k]`` is the concatenation of the 32-byte hashes of the complete
    subtrees of ``2**k`` leaves, left to right; ``levels[0]`` holds the leaf
    hashes. ``len(levels[k + 1]) == len(levels[k]) // 2`` hashes at every level,
    and there is always at least a level 0. Treat ``levels`` as read-only: only
    :meth:`append` and :meth:`extend` may change it.

    For persistence, each level is cut into pages of :data:`PAGE_HASHES`
    hashes. :meth:`dirty_pages` names every page changed since the last
    :meth:`clear_dirty`; :meth:`page` returns one page's bytes; and
    :meth:`from_levels` rebuilds a tree from stored levels without rehashing.
    """

    levels: list[bytearray] = attrs.field(init=False, factory=lambda: [bytearray()], repr=False)
    _dirty: set[tuple[int, int]] = attrs.field(init=False, factory=set, repr=False)

    # -- construction -------------------------------------------------------

    @classmethod
    def from_leaves(cls, leaf_hashes: Iterable[bytes]) -> MerkleTree:
        """A tree holding ``leaf_hashes`` (already leaf-hashed, 32 bytes each)."""
        tree = cls()
        tree.extend(leaf_hashes)
        return tree

    @classmethod
    def from_levels(cls, levels: Sequence[bytes]) -> MerkleTree:
        """Restore a tree from its ``levels`` (as stored) without rehashing.

        Only the shape is checked: every level is a whole number of hashes and
        level ``k + 1`` holds exactly ``floor(len(level k) / 2)`` hashes, up to
        a top level of at most one hash. Trailing empty levels are dropped.
        The restored tree has no dirty pages. Raises :class:`ValueError`.
        """
        restored: list[bytearray] = []
        for k, data in enumerate(levels):
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"level {k} is {type(data).__name__}, not bytes")
            level = bytearray(data)
            if len(level) % HASH_SIZE:
                raise ValueError(f"level {k} is {len(level)} bytes, not a multiple of {HASH_SIZE}")
            restored.append(level)
        while len(restored) > 1 and not restored[-1]:
            restored.pop()
        if not restored:
            restored = [bytearray()]
        for k in range(len(restored) - 1):
            below = len(restored[k]) // HASH_SIZE
            above = len(restored[k + 1]) // HASH_SIZE
            if above != below // 2:
                raise ValueError(
                    f"level {k + 1} has {above} hashes but level {k} has {below}"
                    f" (expected {below // 2})"
                )
        top = len(restored[-1]) // HASH_SIZE
        if top > 1:
            raise ValueError(
                f"level {len(restored) - 1} has {top} hashes but level {len(restored)} is missing"
            )
        tree = cls()
        tree.levels = restored
        return tree

    def __repr__(self) -> str:
        return f"MerkleTree(size={self.size})"

    # -- appending ----------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of leaves."""
        return len(self.levels[0]) // HASH_SIZE

    def append(self, leaf_hash: bytes) -> int:
        """Append one leaf hash (32 bytes, already ``leaf_hash()``-ed); return its index."""
        h = _check_leaf_hash(leaf_hash)
        index = self.size
        if index >= MAX_TREE_SIZE:
            raise ValueError("the tree is full")
        levels = self.levels
        levels[0] += h
        self._dirty.add((0, index // PAGE_HASHES))
        k, i = 0, index
        while i & 1:
            left = levels[k][(i - 1) * HASH_SIZE : i * HASH_SIZE]
            h = _sha256(_NODE_PREFIX + left + h).digest()
            k += 1
            i >>= 1
            if k == len(levels):
                levels.append(bytearray())
            levels[k] += h
            self._dirty.add((k, i // PAGE_HASHES))
        return index

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append many leaf hashes; all are checked before any is appended."""
        buf = bytearray()
        for value in leaf_hashes:
            buf += _check_leaf_hash(value)
        if not buf:
            return
        if self.size + len(buf) // HASH_SIZE > MAX_TREE_SIZE:
            raise ValueError("the tree would exceed its maximum size")
        levels = self.levels
        old = self.size
        levels[0] += buf
        self._mark_dirty(0, old, self.size)
        sha256, prefix, pair = _sha256, _NODE_PREFIX, 2 * HASH_SIZE
        k = 0
        while True:
            below = levels[k]
            want = len(below) // pair
            if want == 0:
                break
            if k + 1 == len(levels):
                levels.append(bytearray())
            above = levels[k + 1]
            have = len(above) // HASH_SIZE
            if have == want:
                break
            above += b"".join(
                [
                    sha256(prefix + below[j * pair : (j + 1) * pair]).digest()
                    for j in range(have, want)
                ]
            )
            self._mark_dirty(k + 1, have, want)
            k += 1

    # -- persistence --------------------------------------------------------

    def _mark_dirty(self, level: int, start: int, end: int) -> None:
        """Mark the pages of ``level`` holding hashes ``start .. end - 1``."""
        for page in range(start // PAGE_HASHES, (end - 1) // PAGE_HASHES + 1):
            self._dirty.add((level, page))

    def page_count(self, level: int) -> int:
        """Number of (possibly partial) pages of ``level``."""
        _check_argument("level", level, len(self.levels) - 1)
        return -(-len(self.levels[level]) // _PAGE_BYTES)

    def page(self, level: int, page: int) -> bytes:
        """Hashes ``page * PAGE_HASHES`` up to ``(page + 1) * PAGE_HASHES`` of ``level``.

        The last page of a level may be partial. ``page`` must be below
        :meth:`page_count`, except that page 0 of an empty level is ``b""``.
        """
        count = self.page_count(level)
        _check_argument("page", page, max(count - 1, 0))
        return bytes(self.levels[level][page * _PAGE_BYTES : (page + 1) * _PAGE_BYTES])

    def dirty_pages(self) -> set[tuple[int, int]]:
        """``(level, page)`` of every page changed since the last :meth:`clear_dirty`."""
        return set(self._dirty)

    def clear_dirty(self) -> None:
        self._dirty.clear()

    # -- reading ------------------------------------------------------------

    def leaf(self, index: int) -> bytes:
        """The leaf hash at ``index``."""
        return self._node(0, _check_index(index, self.size))

    def _size_argument(self, name: str, size: int | None) -> int:
        if size is None:
            return self.size
        return _check_argument(name, size, self.size, " (the tree size)")

    def _node(self, level: int, index: int) -> bytes:
        start = index * HASH_SIZE
        return bytes(self.levels[level][start : start + HASH_SIZE])

    def _range_hash(self, lo: int, hi: int) -> bytes:
        """MTH of leaves ``[lo, hi)``, ``lo < hi``, for a range RFC 9162 recurses into.

        Such a range starts at a multiple of the smallest power of two at least
        ``hi - lo``, so it splits into complete subtrees of strictly decreasing
        size (the binary digits of ``hi - lo``), all stored; MTH folds them
        right to left.
        """
        parts: list[bytes] = []
        pos = lo
        while pos < hi:
            k = (hi - pos).bit_length() - 1
            parts.append(self._node(k, pos >> k))
            pos += 1 << k
        result = parts.pop()
        while parts:
            result = node_hash(parts.pop(), result)
        return result

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves (default: all of them)."""
        n = self._size_argument("size", size)
        if n == 0:
            return EMPTY_ROOT
        return self._range_hash(0, n)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.3.1 ``PATH(index, D[size])`` (default: the whole tree)."""
        n = self._size_argument("size", size)
        m = _check_index(index, n)
        path: list[bytes] = []
        lo, hi = 0, n
        while hi - lo > 1:
            mid = lo + _largest_power_of_two_below(hi - lo)
            if m < mid:
                path.append(self._range_hash(mid, hi))
                hi = mid
            else:
                path.append(self._range_hash(lo, mid))
                lo = mid
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.4.1 ``PROOF(old_size, D[new_size])`` (default: the whole tree).

        The RFC defines ``PROOF`` for ``0 < old_size < new_size``; when
        ``old_size`` is 0 or equals ``new_size`` there is nothing to prove and
        the proof is empty (what :func:`verify_consistency` expects).
        """
        n = self._size_argument("new_size", new_size)
        m = _check_argument("old_size", old_size, n, " (the new size)")
        if m == 0 or m == n:
            return []
        proof: list[bytes] = []
        lo, hi = 0, n
        known = True  # SUBPROOF's b: the subtree ending at m is the old root itself
        while m != hi:
            mid = lo + _largest_power_of_two_below(hi - lo)
            if m <= mid:
                proof.append(self._range_hash(mid, hi))
                hi = mid
            else:
                proof.append(self._range_hash(lo, mid))
                lo = mid
                known = False
        if not known:
            proof.append(self._range_hash(lo, hi))
        proof.reverse()
        return proof


# -- verification -------------------------------------------------------------


def _check_proof_int(name: str, value: object) -> int:
    if not _is_int(value):
        raise ProofError(f"{name} must be an int, got {type(value).__name__}")
    assert isinstance(value, int)
    if not 0 <= value <= MAX_TREE_SIZE:
        raise ProofError(f"{name} {value} is out of range")
    return value


def _check_proof_hash(name: str, value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != HASH_SIZE:
        raise ProofError(f"{name} is not a {HASH_SIZE}-byte hash")
    return bytes(value)


def _check_proof_path(proof: object, limit: int) -> list[bytes]:
    if isinstance(proof, (str, bytes, bytearray)) or not isinstance(proof, Sequence):
        raise ProofError("a proof is a sequence of hashes")
    if len(proof) > limit:
        raise ProofError(f"proof has {len(proof)} elements; at most {limit} are possible")
    return [_check_proof_hash(f"proof element {i}", p) for i, p in enumerate(proof)]


def root_from_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root an RFC 9162 §2.1.3.2 inclusion proof leads to; raise if malformed.

    This does not by itself prove anything: compare the result with a trusted
    root, or call :func:`verify_inclusion`.
    """
    r = _check_proof_hash("leaf hash", leaf_hash)
    fn = _check_proof_int("index", index)
    tree_size = _check_proof_int("size", size)
    path = _check_proof_path(proof, _MAX_INCLUSION_PROOF)
    # 1. leaf_index >= tree_size fails.
    if fn >= tree_size:
        raise ProofError(f"index {fn} is not below tree size {tree_size}")
    # 2. fn = leaf_index, sn = tree_size - 1; 3. r = hash.
    sn = tree_size - 1
    # 4. For each p in the path:
    for p in path:
        # a. sn == 0: the proof is too long.
        if sn == 0:
            raise ProofError("inclusion proof has too many elements")
        # b.
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        # c.
        fn >>= 1
        sn >>= 1
    # 5. sn must end at 0.
    if sn != 0:
        raise ProofError("inclusion proof has too few elements")
    return r


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 §2.1.3.2: return ``None`` if ``proof`` shows ``leaf_hash`` at ``index``
    in the tree of ``size`` leaves with ``root``; otherwise raise :class:`ProofError`."""
    expected = _check_proof_hash("root", root)
    computed = root_from_inclusion(leaf_hash, index, size, proof)
    if not hmac.compare_digest(computed, expected):
        raise ProofError(f"inclusion proof for index {index} does not lead to the root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2: return ``None`` if ``proof`` shows the tree of ``old_size``
    leaves with ``old_root`` is a prefix of the one of ``new_size`` with ``new_root``;
    otherwise raise :class:`ProofError`.

    The RFC algorithm covers ``0 < old_size < new_size``. Outside that range
    nothing is proven and the proof must be empty: equal sizes need equal
    roots, and size 0 needs the empty-tree root ``SHA-256()``.
    """
    first = _check_proof_int("old_size", old_size)
    second = _check_proof_int("new_size", new_size)
    first_hash = _check_proof_hash("old root", old_root)
    second_hash = _check_proof_hash("new root", new_root)
    path = _check_proof_path(proof, _MAX_CONSISTENCY_PROOF)
    if first > second:
        raise ProofError(f"old size {first} is larger than new size {second}")
    if first == 0 or first == second:
        if path:
            raise ProofError(
                f"consistency proof from size {first} to {second} must be empty,"
                f" got {len(path)} elements"
            )
        if first == 0 and not hmac.compare_digest(first_hash, EMPTY_ROOT):
            raise ProofError("old root is not the root of the empty tree")
        if first == second and not hmac.compare_digest(first_hash, second_hash):
            raise ProofError(f"two different roots for tree size {first}")
        return
    # 1. An empty path fails.
    if not path:
        raise ProofError("consistency proof is empty")
    # 2. If first is an exact power of 2, prepend first_hash.
    if first & (first - 1) == 0:
        path.insert(0, first_hash)
    # 3.
    fn = first - 1
    sn = second - 1
    # 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        # a.
        if sn == 0:
            raise ProofError("consistency proof has too many elements")
        # b.
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        # c.
        fn >>= 1
        sn >>= 1
    # 7.
    if sn != 0:
        raise ProofError("consistency proof has too few elements")
    if not hmac.compare_digest(fr, first_hash):
        raise ProofError(f"consistency proof does not lead to the old root (size {first})")
    if not hmac.compare_digest(sr, second_hash):
        raise ProofError(f"consistency proof does not lead to the new root (size {second})")

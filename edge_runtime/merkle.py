"""Merkle trees of append-only logs, as RFC 9162 (Certificate Transparency 2.0) defines them.

A log of ``n`` entries has one root hash, the Merkle Tree Hash (MTH) of its
leaves: ``leaf_hash(d) = SHA-256(0x00 || d)`` and ``node_hash(l, r) =
SHA-256(0x01 || l || r)``, where a tree of ``n > 1`` leaves splits at ``k``,
the largest power of two below ``n``. The prefixes keep a leaf from ever
passing for an inner node.

Two proofs make a log verifiable without holding it:

* an **inclusion proof** shows that one entry is leaf ``i`` of the tree of
  size ``n`` (``log2(n)`` hashes at most);
* a **consistency proof** shows that the tree of size ``m`` is a prefix of the
  tree of size ``n``: nothing the log showed at ``m`` was changed, removed or
  reordered later (also ``log2(n)`` hashes at most, give or take one).

Stores hold the hashes of **perfect subtrees** (``2**level`` leaves starting
at ``index * 2**level``): every hash a proof needs is a fold of a few of them
(:func:`cover`), so a proof costs one batched lookup, whatever the log's size.
:class:`Frontier` keeps only the rightmost perfect subtrees: enough to append
and to know the root, which is all a witness needs to follow a log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

HASH_SIZE = 32
# The root of the empty tree: SHA-256 of nothing.
EMPTY_ROOT = hashlib.sha256(b"").digest()

Key = tuple[int, int]  # (level, index) of a perfect subtree


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two below ``n`` (``n > 1``)."""
    return 1 << ((n - 1).bit_length() - 1)


def cover(start: int, end: int) -> list[Key]:
    """The perfect subtrees whose fold is the MTH of leaves ``[start, end)``, left to right.

    ``start`` must be a multiple of the largest power of two not above
    ``end - start``, as every range in a tree, proof or frontier is.
    """
    if not 0 <= start < end:
        raise ValueError(f"not a range of leaves: [{start}, {end})")
    keys: list[Key] = []
    while start < end:
        size = end - start
        level = size.bit_length() - 1
        width = 1 << level
        if start % width:
            raise ValueError(f"[{start}, {end}) is not a subtree of a Merkle tree")
        keys.append((level, start >> level))
        start += width
    return keys


def fold(hashes: Sequence[bytes]) -> bytes:
    """The MTH of a range from the hashes of its :func:`cover`, left to right."""
    if not hashes:
        return EMPTY_ROOT
    result = hashes[-1]
    for left in reversed(hashes[:-1]):
        result = node_hash(left, result)
    return result


class Tree(Protocol):
    """Where a log keeps the hashes of its perfect subtrees."""

    def nodes(self, keys: Iterable[Key]) -> Mapping[Key, bytes]:
        """The hashes of the given perfect subtrees; a missing one is a KeyError by the caller."""
        ...


def range_hashes(tree: Tree, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The MTH of each range, with one lookup of every perfect subtree they need."""
    covers = [cover(start, end) for start, end in ranges]
    found = tree.nodes({key for keys in covers for key in keys})
    try:
        return [fold([found[key] for key in keys]) for keys in covers]
    except KeyError as exc:
        raise LookupError(f"the tree lacks the subtree {exc.args[0]} (level, index)") from None


def root(tree: Tree, size: int) -> bytes:
    return EMPTY_ROOT if size == 0 else range_hashes(tree, [(0, size)])[0]


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The ranges whose MTH form the inclusion proof of leaf ``index`` in a tree of ``size`` (leaf first)."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size}")
    ranges: list[tuple[int, int]] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
    return ranges[::-1]


def consistency_ranges(old: int, new: int) -> list[tuple[int, int]]:
    """The ranges whose MTH form the consistency proof from size ``old`` to ``new`` (RFC 9162 2.1.4.1)."""
    if not 0 <= old <= new:
        raise ValueError(f"no consistency proof from size {old} to size {new}")
    if old == 0 or old == new:
        return []
    ranges: list[tuple[int, int]] = []
    start, end, m, complete = 0, new, old, True
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start, m, complete = start + k, m - k, False
    if not complete:
        ranges.append((start, end))
    return ranges[::-1]


def inclusion_proof(tree: Tree, index: int, size: int) -> list[bytes]:
    return range_hashes(tree, inclusion_ranges(index, size))


def consistency_proof(tree: Tree, old: int, new: int) -> list[bytes]:
    return range_hashes(tree, consistency_ranges(old, new))


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes | None:
    """The root that ``proof`` makes of ``leaf`` at ``index`` (RFC 9162 2.1.3.2), or None if it cannot be one."""
    if not 0 <= index < size:
        return None
    fn, sn, result = index, size - 1, leaf
    for sibling in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            result = node_hash(sibling, result)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            result = node_hash(result, sibling)
        fn, sn = fn >> 1, sn >> 1
    return result if sn == 0 else None


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], expected_root: bytes) -> bool:
    return root_from_inclusion(index, size, leaf, proof) == expected_root


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """Whether ``proof`` shows that the tree of ``old`` leaves is a prefix of the tree of ``new`` (RFC 9162 2.1.4.2)."""
    if not 0 <= old <= new:
        return False
    if old == new:
        return not proof and old_root == new_root
    if old == 0:
        return not proof
    path = list(proof)
    if old & (old - 1) == 0:  # a power of two: the old root is itself a node of the new tree
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    first = second = path[0]
    for sibling in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            first, second = node_hash(sibling, first), node_hash(sibling, second)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            second = node_hash(second, sibling)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and first == old_root and second == new_root


class Frontier:
    """The rightmost perfect subtrees of a log (its "compact range"): append leaves, know the root.

    ``hashes[i]`` is the hash of the ``i``-th perfect subtree from the left;
    their sizes are the set bits of ``size``, largest first. Appending a leaf
    returns the perfect subtrees it completed, for a store to keep.
    """

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if size < 0 or len(hashes) != bin(size).count("1"):
            raise ValueError(f"a frontier of {size} leaves has {bin(size).count('1')} hashes, not {len(hashes)}")
        self.size = size
        self.hashes = list(hashes)

    def append(self, leaf: bytes) -> list[tuple[Key, bytes]]:
        completed: list[tuple[Key, bytes]] = [((0, self.size), leaf)]
        current, level, index = leaf, 0, self.size
        while index & 1:
            current = node_hash(self.hashes.pop(), current)
            level, index = level + 1, index >> 1
            completed.append(((level, index), current))
        self.hashes.append(current)
        self.size += 1
        return completed

    def root(self) -> bytes:
        return fold(self.hashes)

    def keys(self) -> list[Key]:
        """The (level, index) of each hash, left to right: ``cover(0, size)``."""
        return cover(0, self.size) if self.size else []

    def copy(self) -> Frontier:
        return Frontier(self.size, self.hashes)


class MemoryTree:
    """Every perfect subtree of a list of leaves, in memory: for verifiers and tests."""

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self.levels: list[list[bytes]] = [[]]
        for leaf in leaves:
            self.append(leaf)

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def append(self, leaf: bytes) -> None:
        self.levels[0].append(leaf)
        level, index = 0, len(self.levels[0]) - 1
        while index & 1:
            combined = node_hash(self.levels[level][index - 1], self.levels[level][index])
            level, index = level + 1, index >> 1
            if len(self.levels) == level:
                self.levels.append([])
            self.levels[level].append(combined)

    def nodes(self, keys: Iterable[Key]) -> dict[Key, bytes]:
        found: dict[Key, bytes] = {}
        for level, index in keys:
            if level < len(self.levels) and index < len(self.levels[level]):
                found[(level, index)] = self.levels[level][index]
        return found

    def root(self, size: int | None = None) -> bytes:
        return root(self, self.size if size is None else size)


def root_of(leaves: Iterable[bytes]) -> bytes:
    """The MTH of a sequence of leaf hashes, in one pass and ``log2(n)`` memory."""
    frontier = Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    return frontier.root()

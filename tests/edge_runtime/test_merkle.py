"""The Merkle tree, its proofs and the signed checkpoint formats, against RFC 9162 and C2SP."""

from __future__ import annotations

import base64
import math

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime import merkle, notes

# RFC 6962 / 9162 test leaves and the roots of their first 1..8 (the reference vectors of CT implementations).
LEAVES = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43", bytes(range(0x50, 0x58)),
          bytes(range(0x60, 0x70))]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def reference_mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 2.1.1, written as the RFC says it."""
    if not leaves:
        return merkle.EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(reference_mth(leaves[:k]), reference_mth(leaves[k:]))


def hashes(n: int) -> list[bytes]:
    return [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


def test_roots_match_the_rfc_vectors() -> None:
    tree = merkle.MemoryTree(merkle.leaf_hash(x) for x in LEAVES)
    assert [tree.root(n).hex() for n in range(1, 9)] == ROOTS
    assert merkle.root_of([]) == merkle.EMPTY_ROOT


def test_every_way_to_reach_a_root_agrees() -> None:
    leaves = hashes(70)
    tree = merkle.MemoryTree(leaves)
    frontier = merkle.Frontier()
    for n in range(71):
        expected = reference_mth(leaves[:n])
        assert tree.root(n) == expected == merkle.root_of(leaves[:n]) == frontier.root(), n
        if n < 70:
            completed = frontier.append(leaves[n])
            # What the frontier says it completed is exactly what the full tree holds.
            assert dict(completed) == tree.nodes(k for k, _ in completed)
    restored = merkle.Frontier(frontier.size, frontier.hashes)
    assert restored.keys() == merkle.cover(0, 70) and restored.root() == tree.root()


def test_inclusion_proofs_verify_for_every_leaf_and_only_for_it() -> None:
    leaves = hashes(37)
    tree = merkle.MemoryTree(leaves)
    for size in range(1, 38):
        root = tree.root(size)
        for index in range(size):
            proof = merkle.inclusion_proof(tree, index, size)
            assert len(proof) <= math.ceil(math.log2(size)) if size > 1 else proof == []
            assert merkle.verify_inclusion(index, size, leaves[index], proof, root)
            # Another leaf, another index, another size, a changed proof: each is refused.
            assert not merkle.verify_inclusion(index, size, leaves[(index + 1) % 37], proof, root)
            if size > 1:
                assert not merkle.verify_inclusion((index + 1) % size, size, leaves[index], proof, root)
            if size < 37:
                assert not merkle.verify_inclusion(index, size + 1, leaves[index], proof, tree.root(size + 1))
            if proof:
                assert not merkle.verify_inclusion(index, size, leaves[index], proof[:-1], root)
                assert not merkle.verify_inclusion(index, size, leaves[index], [*proof, proof[0]], root)
    assert not merkle.verify_inclusion(5, 5, leaves[5], [], tree.root(5))


def test_consistency_proofs_verify_between_every_pair_of_sizes() -> None:
    leaves = hashes(33)
    tree = merkle.MemoryTree(leaves)
    for new in range(0, 34):
        for old in range(0, new + 1):
            proof = merkle.consistency_proof(tree, old, new)
            old_root, new_root = tree.root(old), tree.root(new)
            if new > 1:
                assert len(proof) <= math.ceil(math.log2(new)) + 1
            assert merkle.verify_consistency(old, new, old_root, new_root, proof), (old, new)
            if 0 < old < new:
                forged = merkle.node_hash(old_root, b"x" * 32)
                assert not merkle.verify_consistency(old, new, forged, new_root, proof)
                assert not merkle.verify_consistency(old, new, old_root, forged, proof)
                assert not merkle.verify_consistency(old, new, old_root, new_root, proof[1:])
                if new < 33:
                    assert not merkle.verify_consistency(old, new + 1, old_root, tree.root(new + 1), proof)


def test_a_rewritten_history_has_no_consistency_proof() -> None:
    honest = hashes(20)
    forked = [*honest[:11], merkle.leaf_hash(b"forged"), *honest[12:]]
    honest_tree, forked_tree = merkle.MemoryTree(honest), merkle.MemoryTree(forked)
    proof = merkle.consistency_proof(forked_tree, 15, 20)
    assert not merkle.verify_consistency(15, 20, honest_tree.root(15), forked_tree.root(20), proof)
    # Proofs the forked log makes still cannot bridge to the honest old root.
    for old in range(12, 20):
        assert not merkle.verify_consistency(old, 20, honest_tree.root(old), forked_tree.root(20),
                                             merkle.consistency_proof(forked_tree, old, 20))


def test_bad_ranges_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="not in a tree"):
        merkle.inclusion_ranges(4, 4)
    with pytest.raises(ValueError, match="from size 5 to size 4"):
        merkle.consistency_ranges(5, 4)
    with pytest.raises(ValueError, match="not a subtree"):
        merkle.cover(3, 7)
    with pytest.raises(ValueError, match="has 2 hashes"):
        merkle.Frontier(3, [b"x" * 32])
    with pytest.raises(LookupError, match="lacks the subtree"):
        merkle.inclusion_proof(merkle.MemoryTree(hashes(4)), 1, 8)


def test_a_million_leaf_proof_stays_within_log2_n_hashes() -> None:
    # Proof sizes depend on the shape, not the content: a virtual tree answers every subtree with one hash.
    class Shape:
        def nodes(self, keys):  # type: ignore[no-untyped-def]
            return {key: b"\x00" * 32 for key in keys}

    size = 1_000_003
    bound = math.ceil(math.log2(size)) * merkle.HASH_SIZE
    assert len(b"".join(merkle.inclusion_proof(Shape(), 765_432, size))) <= bound
    assert len(b"".join(merkle.consistency_proof(Shape(), 999_999, size))) <= bound


# -- signed notes ---------------------------------------------------------------------------------------------------

def test_checkpoint_signed_cosigned_and_verified() -> None:
    log_key, witness_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    checkpoint = notes.Checkpoint("example.org/log", 12, merkle.root_of(hashes(12)))
    signed = notes.sign_note(checkpoint.body(), "example.org/log", log_key)
    assert signed.startswith("example.org/log\n12\n") and "\n\n\u2014 example.org/log " in signed
    cosigned = notes.add_cosignature(signed, "witness.example", witness_key, 1_700_000_000)
    note, opened = notes.open_checkpoint(cosigned, "example.org/log", log_key.public_key())
    assert opened == checkpoint and notes.Checkpoint.parse(checkpoint.body()) == checkpoint
    assert notes.verify_cosignature(note, "witness.example", witness_key.public_key()) == 1_700_000_000
    # A cosignature is no plain signature, and the wrong key verifies neither.
    with pytest.raises(notes.NoteError, match="no signature of witness.example"):
        notes.verify_signature(note, "witness.example", witness_key.public_key())
    with pytest.raises(notes.NoteError, match="no cosignature"):
        notes.verify_cosignature(note, "witness.example", log_key.public_key())
    name, key = notes.parse_vkey(notes.vkey("example.org/log", log_key.public_key()))
    assert name == "example.org/log" and notes.key_id(name, key) == notes.key_id(name, log_key.public_key())


def test_a_changed_checkpoint_or_signature_does_not_verify() -> None:
    key = Ed25519PrivateKey.generate()
    signed = notes.sign_note(notes.Checkpoint("o", 3, b"\x01" * 32).body(), "o", key)
    with pytest.raises(notes.NoteError, match="does not verify"):
        notes.open_checkpoint(signed.replace("\n3\n", "\n4\n", 1), "o", key.public_key())
    cosigned = notes.add_cosignature(signed, "w", key, 5)
    line = cosigned.rstrip("\n").rsplit("\n", 1)[1]
    blob = bytearray(base64.b64decode(line.split(" ")[2]))
    blob[4 + 7] ^= 1  # the timestamp
    tampered = cosigned.replace(line, f"\u2014 w {base64.b64encode(bytes(blob)).decode()}")
    with pytest.raises(notes.NoteError, match="cosignature of w does not verify"):
        notes.verify_cosignature(notes.parse_note(tampered), "w", key.public_key())


@pytest.mark.parametrize(("body", "message"), [
    ("o\n12\n", "one per line"),
    ("o\n012\nAAAA\n", "not a decimal"),
    ("o\n-1\nAAAA\n", "not a decimal"),
    ("o\n1\n!!!!\n", "not base64"),
    ("o\n1\nAAAA\n", "not 32"),
    (" o\n1\nAAAA\n", "padded"),
])
def test_malformed_checkpoints_are_named(body: str, message: str) -> None:
    with pytest.raises(notes.NoteError, match=message):
        notes.Checkpoint.parse(body)


@pytest.mark.parametrize(("note", "message"), [
    ("o\n1\n", "blank line"),
    ("o\n1\n\n- o AAAA\n", "not a signature line"),
    ("o\n1\n\n\u2014 o AAAA\n", "too short"),
    ("o\n" * 40000 + "\n", "at most"),
])
def test_malformed_notes_are_named(note: str, message: str) -> None:
    with pytest.raises(notes.NoteError, match=message):
        notes.parse_note(note)


def test_bad_verifier_keys_are_named() -> None:
    key = Ed25519PrivateKey.generate()
    good = notes.vkey("log", key.public_key())
    with pytest.raises(notes.NoteError, match="does not match"):
        notes.parse_vkey(good.replace("log+", "other+", 1))
    with pytest.raises(notes.NoteError, match=r"<name>\+<key id>\+<key>"):
        notes.parse_vkey("log+abcd")

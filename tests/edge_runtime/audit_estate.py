"""An estate's audit trail made up for tests: the control plane's log and three nodes' logs, honestly signed.

Each log's checkpoints and proofs are made once, from its entries as they are
then; a test that edits the entries afterwards and writes the bundle gets a
bundle whose signatures no longer match what it holds, as a forger would.
"""

from __future__ import annotations

import json
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.audit_bundle import BundleWriter, Proof, proofs_between
from edge_runtime.canonical import canonical_json
from edge_runtime.merkle import MemoryTree, leaf_hash
from edge_runtime.notes import Checkpoint, add_cosignature, sign_note, vkey
from edge_runtime.protocol.audit import LogEntry, entry_chain_hash

CP_ORIGIN = "edgewise.test/audit"
CP_ENTRIES = "control-plane/entries.jsonl"
T0 = 1_750_000_000
GENESIS = "0" * 64


def node_origin(node: str) -> str:
    return f"edgewise/node/{node}"


def checkpoint_note(origin: str, key: Ed25519PrivateKey, tree: MemoryTree, size: int, *,
                    cosigner: Ed25519PrivateKey | None, at: int) -> str:
    note = sign_note(Checkpoint(origin, size, tree.root(size)).body(), origin, key)
    return add_cosignature(note, CP_ORIGIN, cosigner, at) if cosigner is not None else note


def node_entries(count: int, label: str) -> list[LogEntry]:
    entries: list[LogEntry] = []
    prev = GENESIS
    for seq in range(1, count + 1):
        entry = LogEntry(seq=seq, at=f"2025-06-01T10:00:{seq % 60:02d}+00:00", action="query.run",
                         detail=canonical_json({"node": label, "n": seq}), prev_hash=prev)
        prev = entry_chain_hash(entry.leaf_data())
        entries.append(entry)
    return entries


def cp_event(seq: int, action: str, after: object = None) -> str:
    return canonical_json({"seq": seq, "action": action, "actor": "ada@example.org", "actor_type": "user",
                           "created_at": f"2025-06-01T10:{seq % 60:02d}:00+00:00", "after": after,
                           "before": None, "object_repr": f"thing {seq}", "prev_hash": None})


@dataclass
class NodeLog:
    node: str
    site: str
    key: Ed25519PrivateKey
    entries: list[LogEntry]
    sizes: list[int]
    checkpoints: list[str] = field(default_factory=list)
    proofs: list[Proof] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return node_origin(self.node)

    @property
    def vkey(self) -> str:
        return vkey(self.origin, self.key.public_key())

    def tree(self) -> MemoryTree:
        return MemoryTree(entry.leaf_hash() for entry in self.entries)

    def sign(self, cp_key: Ed25519PrivateKey) -> None:
        tree = self.tree()
        self.checkpoints = [checkpoint_note(self.origin, self.key, tree, size, cosigner=cp_key, at=T0 + size)
                            for size in self.sizes]
        self.proofs = proofs_between(tree, self.sizes)


@dataclass
class Estate:
    key: Ed25519PrivateKey
    entries: list[str]
    sizes: list[int]
    nodes: list[NodeLog]
    checkpoints: list[str] = field(default_factory=list)
    proofs: list[Proof] = field(default_factory=list)

    @property
    def vkey(self) -> str:
        return vkey(CP_ORIGIN, self.key.public_key())

    def tree(self) -> MemoryTree:
        return MemoryTree(leaf_hash(data.encode()) for data in self.entries)

    def sign(self) -> None:
        tree = self.tree()
        self.checkpoints = [checkpoint_note(CP_ORIGIN, self.key, tree, size, cosigner=self.key, at=T0 + size)
                            for size in self.sizes]
        self.proofs = proofs_between(tree, self.sizes)

    def write(self, path: Path) -> Path:
        with BundleWriter(path, origin=CP_ORIGIN, vkey=self.vkey) as bundle:
            bundle.control_plane(entries=enumerate(self.entries), checkpoints=self.checkpoints, proofs=self.proofs)
            for log in self.nodes:
                bundle.node(node=log.node, site=log.site, origin=log.origin, vkey=log.vkey, entries=log.entries,
                            checkpoints=log.checkpoints, proofs=log.proofs)
        return path


# The control plane's log: 14 events, checkpoints at 4, 9 and 12 (two not yet covered); position 10 records the
# nodes' heads. Node logs: 7 entries (checkpoints 3, 5, 7), 12 entries (4, 8, 12), 5 entries (5).
NODE_SHAPES = [(7, [3, 5, 7]), (12, [4, 8, 12]), (5, [5])]
HEADS_POSITION = 10


def estate(*, key: Ed25519PrivateKey | None = None, wrong_head: bool = False) -> Estate:
    """An honest estate; ``wrong_head``: the control plane's log records a root for node 0 that its log never had."""
    cp_key = key or Ed25519PrivateKey.generate()
    site = str(uuid.uuid4())
    nodes = [NodeLog(str(uuid.uuid4()), site, Ed25519PrivateKey.generate(), node_entries(count, f"n{i}"), sizes)
             for i, (count, sizes) in enumerate(NODE_SHAPES)]
    heads: dict[str, list[object]] = {}
    for log in nodes:
        log.sign(cp_key)
        size = log.sizes[1] if len(log.sizes) > 1 else log.sizes[0]
        heads[log.node] = [size, log.tree().root(size).hex()]
    if wrong_head:
        heads[nodes[0].node] = [heads[nodes[0].node][0], "ab" * 32]
    entries = [cp_event(seq, "site.update", {"n": seq}) for seq in range(1, HEADS_POSITION + 1)]
    entries.append(cp_event(HEADS_POSITION + 1, "audit.node_heads", {"through": 3, "heads": heads}))
    entries += [cp_event(seq, "role.grant", {"n": seq}) for seq in range(HEADS_POSITION + 2, 15)]
    result = Estate(cp_key, entries, [4, 9, 12], nodes)
    result.sign()
    return result


def rewrite(path: Path, member: str, change: Callable[[bytes], bytes]) -> Path:
    """The bundle with one member changed, as someone holding the file could (the zip itself stays sound)."""
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    members[member] = change(members[member])
    out = path.with_name(f"tampered-{path.name}")
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out


def edit_lines(change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> Callable[[bytes], bytes]:
    def apply(data: bytes) -> bytes:
        rows = change([json.loads(line) for line in data.decode().splitlines()])
        return "".join(json.dumps(row) + "\n" for row in rows).encode()

    return apply

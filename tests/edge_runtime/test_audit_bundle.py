"""The auditor's bundle checked standalone: an honest export passes, every tampered variant is refused by name."""

from __future__ import annotations

import base64
import json
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.audit_bundle import (
    BundleError,
    BundleReport,
    LogReport,
    inclusion_proof_document,
    verify_bundle,
    verify_inclusion_file,
)
from edge_runtime.merkle import inclusion_proof
from edge_runtime.notes import Checkpoint, add_cosignature, sign_note, vkey
from tests.edge_runtime.audit_estate import (
    CP_ENTRIES,
    CP_ORIGIN,
    T0,
    Estate,
    checkpoint_note,
    cp_event,
    edit_lines,
    estate,
    rewrite,
)

CP_CHECKPOINTS = "control-plane/checkpoints.txt"


def log(report: BundleReport, name: str) -> LogReport:
    return next(item for item in report.logs if item.log == name)


def failures(report: BundleReport) -> dict[str, str]:
    found = {item.log: item.error for item in report.logs if item.error}
    return {**found, **({"bundle": report.errors[0]} if report.errors else {})}


@pytest.fixture()
def honest() -> Estate:
    return estate()


def test_it_accepts_an_honest_bundle(honest: Estate, tmp_path: Path) -> None:
    report = verify_bundle(honest.write(tmp_path / "b.zip"), trusted_vkey=honest.vkey)
    assert report.ok and failures(report) == {} and not report.key_from_bundle
    assert report.control_plane_vkey == honest.vkey and report.control_plane_origin == CP_ORIGIN
    cp = log(report, "control-plane")
    assert (cp.entries, cp.checkpoints, cp.last_size, cp.uncovered, cp.last_cosigned_at) == (14, 3, 12, 2, T0 + 12)
    for node in honest.nodes:
        mine = log(report, node.node)
        assert (mine.entries, mine.last_size, mine.site, mine.heads_checked) == (len(node.entries), node.sizes[-1],
                                                                                 node.site, 1)
    # Without a key to trust, it still verifies, and says whose key it used.
    assert verify_bundle(tmp_path / "b.zip").key_from_bundle


CP_TAMPERING: dict[str, tuple[Callable[[list[dict[str, Any]]], list[dict[str, Any]]], str]] = {
    "edited": (lambda rows: [*rows[:6], {**rows[6], "leaf_data": rows[6]["leaf_data"].replace("ada", "eve")},
                             *rows[7:]],
               "checkpoint 2 (size 9) does not match the entries: one of positions 4..8 was edited, removed, "
               "inserted or moved since it was signed"),
    "removed": (lambda rows: rows[:6] + rows[7:],
                "line 7 holds position 7 where position 6 belongs: an entry was removed, inserted or moved"),
    "removed and renumbered": (lambda rows: [{**row, "position": i} for i, row in enumerate(rows[:6] + rows[7:])],
                               "checkpoint 2 (size 9) does not match the entries: one of positions 4..8"),
    "inserted": (lambda rows: [*rows[:7], {"position": 6, "leaf_data": cp_event(7, "role.grant")}, *rows[7:]],
                 "line 8 holds position 6 where position 7 belongs"),
    "inserted and renumbered": (
        lambda rows: [{**row, "position": i} for i, row in
                      enumerate([*rows[:2], {"position": 0, "leaf_data": cp_event(3, "role.grant")}, *rows[2:]])],
        "checkpoint 1 (size 4) does not match the entries: one of positions 0..3"),
    "swapped": (lambda rows: [rows[0], {**rows[1], "leaf_data": rows[2]["leaf_data"]},
                              {**rows[2], "leaf_data": rows[1]["leaf_data"]}, *rows[3:]],
                "checkpoint 1 (size 4) does not match the entries: one of positions 0..3"),
    "swapped with their positions": (lambda rows: [rows[0], rows[2], rows[1], *rows[3:]],
                                     "line 2 holds position 2 where position 1 belongs"),
    "tail cut below a checkpoint": (lambda rows: rows[:10],
                                    "checkpoint 3 (size 12) covers 12 entries but the bundle holds only 10: "
                                    "positions 10..11 are missing (the tail was cut)"),
    "last covered entry edited": (lambda rows: [*rows[:11], {**rows[11], "leaf_data": "{}"}, *rows[12:]],
                                  "checkpoint 3 (size 12) does not match the entries: one of positions 9..11 "
                                  "was edited"),
}


@pytest.mark.parametrize("how", list(CP_TAMPERING))
def test_it_refuses_control_plane_entries_tampered_with(honest: Estate, tmp_path: Path, how: str) -> None:
    change, says = CP_TAMPERING[how]
    report = verify_bundle(rewrite(honest.write(tmp_path / "b.zip"), CP_ENTRIES, edit_lines(change)),
                           trusted_vkey=honest.vkey)
    assert not report.ok
    assert list(failures(report)) == ["control-plane"]
    assert says in failures(report)["control-plane"]


def test_entries_after_the_last_checkpoint_are_not_yet_covered_not_an_error(honest: Estate, tmp_path: Path) -> None:
    bundle = honest.write(tmp_path / "b.zip")
    cut = verify_bundle(rewrite(bundle, CP_ENTRIES, edit_lines(lambda rows: rows[:12])))
    assert cut.ok and log(cut, "control-plane").uncovered == 0
    edited = verify_bundle(rewrite(bundle, CP_ENTRIES, edit_lines(lambda rows: [*rows[:13], {**rows[13],
                                                                                             "leaf_data": "{}"}])))
    assert edited.ok and log(edited, "control-plane").uncovered == 2


NODE_TAMPERING: dict[str, tuple[Callable[[list[dict[str, Any]]], list[dict[str, Any]]], str]] = {
    "edited": (lambda rows: [*rows[:5], {**rows[5], "detail": '{"n":0}'}, *rows[6:]],
               "checkpoint 2 (size 8) does not match the entries: one of entries #5..#8 was edited"),
    "removed": (lambda rows: rows[:5] + rows[6:], "line 6 holds entry #7 where entry #6 belongs"),
    "swapped": (lambda rows: [*rows[:4], {**rows[5], "seq": 5}, {**rows[4], "seq": 6}, *rows[6:]],
                "checkpoint 2 (size 8) does not match the entries: one of entries #5..#8"),
    "tail cut": (lambda rows: rows[:9], "checkpoint 3 (size 12) covers 12 entries but the bundle holds only 9: "
                                        "entries #10..#12 are missing (the tail was cut)"),
    "malformed": (lambda rows: [*rows[:2], {**rows[2], "prev_hash": "x"}, *rows[3:]],
                  "line 3 of nodes/{node}/entries.jsonl is not a log entry: prev_hash:"),
}


@pytest.mark.parametrize("how", list(NODE_TAMPERING))
def test_it_refuses_node_entries_tampered_with(honest: Estate, tmp_path: Path, how: str) -> None:
    change, says = NODE_TAMPERING[how]
    node = honest.nodes[1].node
    report = verify_bundle(rewrite(honest.write(tmp_path / "b.zip"), f"nodes/{node}/entries.jsonl",
                                   edit_lines(change)), trusted_vkey=honest.vkey)
    assert list(failures(report)) == [node]
    assert says.format(node=node) in failures(report)[node]


def test_it_refuses_a_checkpoint_whose_size_or_root_was_edited(honest: Estate, tmp_path: Path) -> None:
    bundle = honest.write(tmp_path / "b.zip")
    notes = honest.checkpoints
    size_edited = rewrite(bundle, CP_CHECKPOINTS, lambda data: data.replace(b"\n9\n", b"\n8\n"))
    assert failures(verify_bundle(size_edited))["control-plane"] == \
        f"checkpoint 2 (size 8): the signature of {CP_ORIGIN} does not verify"
    root_1, root_2 = (note.split("\n")[2].encode() for note in notes[:2])
    root_edited = rewrite(bundle, CP_CHECKPOINTS, lambda data: data.replace(root_2, root_1))
    assert failures(verify_bundle(root_edited))["control-plane"] == \
        f"checkpoint 2 (size 9): the signature of {CP_ORIGIN} does not verify"


def replace_node_checkpoint(estate_: Estate, tmp_path: Path, number: int, note: str) -> BundleReport:
    estate_.nodes[0].checkpoints[number - 1] = note
    return verify_bundle(estate_.write(tmp_path / "b.zip"), trusted_vkey=estate_.vkey)


def test_it_refuses_a_node_checkpoint_signed_by_another_key(honest: Estate, tmp_path: Path) -> None:
    node = honest.nodes[0]
    forged = checkpoint_note(node.origin, Ed25519PrivateKey.generate(), node.tree(), 5, cosigner=honest.key, at=T0)
    assert failures(replace_node_checkpoint(honest, tmp_path, 2, forged)) == {
        node.node: f"checkpoint 2 (size 5): the note carries no signature of {node.origin} with that key"}


def test_it_refuses_a_node_checkpoint_the_control_plane_did_not_cosign(honest: Estate, tmp_path: Path) -> None:
    node = honest.nodes[0]
    for cosigner in (None, Ed25519PrivateKey.generate()):
        note = checkpoint_note(node.origin, node.key, node.tree(), 3, cosigner=cosigner, at=T0)
        assert failures(replace_node_checkpoint(honest, tmp_path, 1, note)) == {
            node.node: f"checkpoint 1 (size 3): the note carries no cosignature of {CP_ORIGIN} with that key"}


def test_it_refuses_checkpoints_whose_sizes_decrease_or_that_fork(honest: Estate, tmp_path: Path) -> None:
    cp = honest.checkpoints
    honest.checkpoints = [cp[1], cp[0], cp[2]]
    assert failures(verify_bundle(honest.write(tmp_path / "b.zip")))["control-plane"] == \
        "checkpoint 2 (size 4) is smaller than checkpoint 1 (size 9): the log shrank"
    other = Checkpoint(CP_ORIGIN, 9, b"\x01" * 32).body()
    honest.checkpoints = [cp[0], cp[1], add_cosignature(sign_note(other, CP_ORIGIN, honest.key), CP_ORIGIN,
                                                        honest.key, T0)]
    assert failures(verify_bundle(honest.write(tmp_path / "b.zip")))["control-plane"] == \
        "checkpoint 3 (size 9) has the size of checkpoint 2 but another root: the log forked"


def test_it_refuses_an_altered_or_missing_proof(honest: Estate, tmp_path: Path) -> None:
    bundle = honest.write(tmp_path / "b.zip")

    def alter(data: bytes) -> bytes:
        proofs = json.loads(data)
        first = base64.b64decode(proofs["control-plane"][0]["proof"][0])
        proofs["control-plane"][0]["proof"][0] = base64.b64encode(bytes([first[0] ^ 1]) + first[1:]).decode()
        return json.dumps(proofs).encode()

    assert failures(verify_bundle(rewrite(bundle, "proofs.json", alter))) == {
        "control-plane": "the consistency proof from size 4 to size 9 does not verify: the checkpoints of size 4 "
                         "and 9 are not one history"}

    def drop(data: bytes) -> bytes:
        return json.dumps({**json.loads(data), "control-plane": json.loads(data)["control-plane"][1:]}).encode()

    assert failures(verify_bundle(rewrite(bundle, "proofs.json", drop))) == {
        "control-plane": "proofs.json holds no consistency proof from size 4 to size 9"}


def test_it_refuses_a_node_log_that_disagrees_with_the_head_the_control_plane_recorded(tmp_path: Path) -> None:
    forged = estate(wrong_head=True)
    report = verify_bundle(forged.write(tmp_path / "b.zip"), trusted_vkey=forged.vkey)
    node = forged.nodes[0]
    assert list(failures(report)) == [node.node]
    assert failures(report)[node.node].startswith(
        f"control plane position 10 (audit.node_heads) records this log at size 5 with root {'ab' * 32}, "
        f"but its entries give {node.tree().root(5).hex()}: the node's log is not the one the control plane recorded")


def test_it_refuses_a_bundle_that_leaves_out_a_node_whose_head_was_recorded(honest: Estate, tmp_path: Path) -> None:
    left_out = honest.nodes.pop()
    assert failures(verify_bundle(honest.write(tmp_path / "b.zip"))) == {
        "control-plane": f"position 10 (audit.node_heads) records the head of node {left_out.node}, "
                         "whose log the bundle does not hold"}


def test_it_refuses_a_bundle_signed_by_another_key_than_the_one_trusted(honest: Estate, tmp_path: Path) -> None:
    # A whole estate forged with the forger's own key agrees with itself...
    forged = estate(key=Ed25519PrivateKey.generate())
    bundle = forged.write(tmp_path / "forged.zip")
    assert verify_bundle(bundle).ok
    # ...but not with the key the auditor trusts.
    report = verify_bundle(bundle, trusted_vkey=honest.vkey)
    assert not report.ok and report.logs == []
    assert report.errors[0].startswith("the bundle is signed by another key than the one you trust")


def test_it_refuses_a_manifest_whose_key_was_swapped(honest: Estate, tmp_path: Path) -> None:
    other = vkey(CP_ORIGIN, Ed25519PrivateKey.generate().public_key())

    def swap(data: bytes) -> bytes:
        return data.replace(honest.vkey.encode(), other.encode())

    swapped = rewrite(honest.write(tmp_path / "b.zip"), "manifest.json", swap)
    assert verify_bundle(swapped, trusted_vkey=honest.vkey).errors[0].startswith(
        "the bundle is signed by another key than the one you trust")
    found = failures(verify_bundle(swapped))
    assert found["control-plane"] == \
        f"checkpoint 1 (size 4): the note carries no signature of {CP_ORIGIN} with that key"
    assert found[honest.nodes[0].node] == \
        f"checkpoint 1 (size 3): the note carries no cosignature of {CP_ORIGIN} with that key"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda m: {**m, "version": 2}, "version 2 of the bundle format is not known here"),
        (lambda m: {**m, "nodes": [{**m["nodes"][0], "origin": "edgewise/node/x"}, *m["nodes"][1:]]},
         "manifest.json: the key of node {node} is named 'edgewise/node/{node}', not after its origin "
         "'edgewise/node/x'"),
        (lambda m: {**m, "nodes": [m["nodes"][0], *m["nodes"]]}, "manifest.json names node {node} twice"),
        (lambda m: {**m, "nodes": m["nodes"][1:]}, "the bundle holds nodes/{node}/"),
        (lambda m: {**m, "control_plane": {"origin": CP_ORIGIN, "vkey": "x+y+z"}},
         "manifest.json: the control plane's key is not a verifier key"),
        (lambda m: {**m, "created_at": "yesterday"}, "manifest.json is malformed: created_at:"),
    ],
)
def test_it_refuses_a_malformed_manifest(honest: Estate, tmp_path: Path, change: Callable[[Any], Any],
                                         says: str) -> None:
    bundle = rewrite(honest.write(tmp_path / "b.zip"), "manifest.json",
                     lambda data: json.dumps(change(json.loads(data))).encode())
    report = verify_bundle(bundle)
    assert not report.ok and report.logs == []
    assert says.format(node=honest.nodes[0].node) in report.errors[0]


def test_it_refuses_a_log_with_entries_but_no_checkpoint(honest: Estate, tmp_path: Path) -> None:
    honest.nodes[2].checkpoints, honest.nodes[2].proofs = [], []
    assert failures(verify_bundle(honest.write(tmp_path / "b.zip"))) == {
        honest.nodes[2].node: "the log holds 5 entries but no checkpoint: nothing vouches for them"}


def test_it_says_what_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BundleError, match="is not an audit bundle"):
        verify_bundle(tmp_path / "notes.txt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(BundleError, match="it has no manifest.json"):
        verify_bundle(tmp_path / "other.zip")
    with pytest.raises(BundleError, match="the key to trust is not a verifier key"):
        verify_bundle(tmp_path / "other.zip", trusted_vkey="not-a-key")


def test_it_streams_the_entries_instead_of_holding_them(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    entries = [cp_event(seq, "site.update", {"pad": "x" * 300}) for seq in range(1, 20_001)]
    big = Estate(key, entries, [10_000, 20_000], [])
    big.sign()
    bundle = big.write(tmp_path / "big.zip")
    size = sum(len(e) for e in entries)
    del entries, big
    tracemalloc.start()
    try:
        report = verify_bundle(bundle)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok and log(report, "control-plane").entries == 20_000
    assert peak < size / 4, f"verifying {size} bytes of entries took {peak} bytes of memory"


# -- inclusion proofs ---------------------------------------------------------------------------------------------


def cp_inclusion(estate_: Estate, index: int, leaf_index: int | None = None) -> dict[str, Any]:
    size = estate_.sizes[-1]
    return inclusion_proof_document(origin=CP_ORIGIN, vkey=estate_.vkey, index=index,
                                    proof=inclusion_proof(estate_.tree(), index if leaf_index is None else leaf_index,
                                                          size),
                                    checkpoint=estate_.checkpoints[-1], leaf_data=estate_.entries[index])


def node_inclusion(estate_: Estate, seq: int) -> dict[str, Any]:
    node = estate_.nodes[1]
    return inclusion_proof_document(origin=node.origin, vkey=node.vkey, cosigner_vkey=estate_.vkey, index=seq - 1,
                                    proof=inclusion_proof(node.tree(), seq - 1, node.sizes[-1]),
                                    checkpoint=node.checkpoints[-1], entry=node.entries[seq - 1])


def check(document: dict[str, Any], tmp_path: Path, trusted: str | None) -> Any:
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(document))
    return verify_inclusion_file(path, trusted_vkey=trusted)


def test_it_accepts_an_inclusion_proof_of_a_control_plane_event_and_of_a_node_entry(honest: Estate,
                                                                                      tmp_path: Path) -> None:
    report = check(cp_inclusion(honest, 10), tmp_path, honest.vkey)
    assert report.ok and (report.index, report.size, report.action) == (10, 12, "audit.node_heads")
    assert not report.key_from_file
    node = check(node_inclusion(honest, 6), tmp_path, honest.vkey)
    assert node.ok and (node.index, node.size, node.action, node.cosigned_at) == (5, 12, "query.run", T0 + 12)
    assert check(node_inclusion(honest, 6), tmp_path, None).key_from_file


def test_it_refuses_an_inclusion_proof_for_another_entry(honest: Estate, tmp_path: Path) -> None:
    other = {**cp_inclusion(honest, 4), "leaf_data": honest.entries[3]}
    assert check(other, tmp_path, honest.vkey).error == (
        "the proof does not show this entry as leaf 4 of the log of size 12 that the checkpoint signs: it is not "
        "the entry the log holds there")
    shifted = {**node_inclusion(honest, 6), "entry": node_inclusion(honest, 7)["entry"]}
    assert check(shifted, tmp_path, honest.vkey).error == "the entry is #7, but the proof is for leaf 5 (entry #6)"


def test_it_refuses_an_inclusion_proof_signed_by_another_key_than_the_one_trusted(honest: Estate,
                                                                                   tmp_path: Path) -> None:
    forged = estate(key=Ed25519PrivateKey.generate())
    assert check(cp_inclusion(forged, 2), tmp_path, None).ok
    assert check(cp_inclusion(forged, 2), tmp_path, honest.vkey).error == \
        "the inclusion proof is signed by another key than the one you trust"
    node = honest.nodes[1]
    uncosigned = checkpoint_note(node.origin, node.key, node.tree(), 12, cosigner=None, at=T0)
    assert check({**node_inclusion(honest, 6), "checkpoint": uncosigned}, tmp_path, honest.vkey).error == \
        f"the checkpoint: the note carries no cosignature of {CP_ORIGIN} with that key"


def test_it_says_what_is_not_an_inclusion_proof(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"format": "something-else"}')
    with pytest.raises(BundleError, match="JSON but not an inclusion proof"):
        verify_inclusion_file(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("not json")
    with pytest.raises(BundleError, match="neither an audit bundle"):
        verify_inclusion_file(tmp_path / "y.json")

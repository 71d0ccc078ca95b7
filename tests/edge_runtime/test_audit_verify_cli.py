"""``edge-runtime audit-verify`` as an auditor runs it: a real process with nothing but the edge runtime and a file."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.audit_bundle import inclusion_proof_document
from edge_runtime.merkle import inclusion_proof
from tests.edge_runtime.audit_estate import CP_ENTRIES, Estate, edit_lines, estate, rewrite

pytestmark = pytest.mark.process

WARNING = "warning: no --vkey given: checked with the key the bundle names itself"


def audit_verify(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # No settings, no network, no Django in the environment: what an auditor's laptop has.
    return subprocess.run([sys.executable, "-m", "edge_runtime", "audit-verify", *args], cwd=cwd,
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)


@pytest.fixture()
def honest() -> Estate:
    return estate()


def test_it_verifies_an_honest_bundle_against_the_trusted_key(honest: Estate, tmp_path: Path) -> None:
    bundle = honest.write(tmp_path / "estate.zip")
    result = audit_verify(str(bundle), "--vkey", honest.vkey, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "control plane log: ok: 14 entries, 3 checkpoints, last size 12" in result.stdout
    assert "2 of its entries not yet covered by a checkpoint" in result.stdout
    for node in honest.nodes:
        assert f"node {node.node} (site {node.site}): ok: {len(node.entries)} entries" in result.stdout
    assert result.stdout.rstrip().endswith("verified: 4 logs, 38 entries")


def test_it_warns_when_no_key_to_trust_is_given(honest: Estate, tmp_path: Path) -> None:
    result = audit_verify(str(honest.write(tmp_path / "estate.zip")), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert WARNING in result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["key_from_bundle"] and len(report["logs"]) == 4


def test_it_exits_1_with_the_reason_for_a_tampered_bundle(honest: Estate, tmp_path: Path) -> None:
    bundle = rewrite(honest.write(tmp_path / "estate.zip"), CP_ENTRIES,
                     edit_lines(lambda rows: [*rows[:6], {**rows[6], "leaf_data": "{}"}, *rows[7:]]))
    result = audit_verify(str(bundle), "--vkey", honest.vkey, cwd=tmp_path)
    assert result.returncode == 1
    assert "control plane log: FAILED: checkpoint 2 (size 9) does not match the entries" in result.stdout
    assert ("edge-runtime audit-verify: the bundle does not verify: the control plane log: checkpoint 2 (size 9) "
            "does not match the entries: one of positions 4..8") in result.stderr


def test_it_exits_1_for_a_bundle_signed_by_another_key(honest: Estate, tmp_path: Path) -> None:
    forged = estate(key=Ed25519PrivateKey.generate()).write(tmp_path / "forged.zip")
    result = audit_verify(str(forged), "--vkey", honest.vkey, cwd=tmp_path)
    assert result.returncode == 1
    assert "the bundle is signed by another key than the one you trust" in result.stderr


def test_it_verifies_an_inclusion_proof_and_refuses_one_for_another_entry(honest: Estate, tmp_path: Path) -> None:
    document = inclusion_proof_document(origin=honest.nodes[0].origin, vkey=honest.nodes[0].vkey, index=2,
                                        proof=inclusion_proof(honest.nodes[0].tree(), 2, 7),
                                        checkpoint=honest.nodes[0].checkpoints[-1], entry=honest.nodes[0].entries[2],
                                        cosigner_vkey=honest.vkey)
    (tmp_path / "entry.json").write_text(json.dumps(document))
    result = audit_verify("entry.json", "--vkey", honest.vkey, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "verified: leaf 2 (query.run) of edgewise/node/" in result.stdout
    assert "is in the log of size 7 that its checkpoint signs, cosigned 2025-" in result.stdout
    (tmp_path / "other.json").write_text(json.dumps({**document, "index": 3,
                                                     "entry": {**document["entry"], "seq": 4}}))
    refused = audit_verify("other.json", "--vkey", honest.vkey, cwd=tmp_path)
    assert refused.returncode == 1
    assert "the inclusion proof does not verify: the proof does not show this entry as leaf 3" in refused.stderr


def test_it_exits_2_on_usage_errors(honest: Estate, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    bundle = honest.write(tmp_path / "estate.zip")
    cases = {
        ("missing.zip",): "missing.zip does not exist",
        (".",): ". is not a file",
        ("notes.txt",): "notes.txt is neither an audit bundle (a zip file) nor an inclusion proof (JSON)",
        ("other.zip",): "other.zip is a zip file but not an audit bundle: it has no manifest.json",
        (str(bundle), "--vkey", "not-a-key"): "the key to trust is not a verifier key",
    }
    for args, says in cases.items():
        result = audit_verify(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert f"edge-runtime audit-verify: {says}" in result.stderr
    assert audit_verify(cwd=tmp_path).returncode == 2

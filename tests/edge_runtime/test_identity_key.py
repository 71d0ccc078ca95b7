"""The node's identity key in its state dir, and the protocol fields that carry its public half."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from edge_runtime import signing
from edge_runtime.identity_key import KEY_FILE, NEXT_KEY_FILE, NodeKey, promote_next_key
from edge_runtime.protocol import EnrollRequest, SyncRequest
from edge_runtime.state import StateError


def test_it_creates_the_key_readable_by_its_owner_only(tmp_path: Path) -> None:
    key = NodeKey.load_or_create(tmp_path / "node")
    path = tmp_path / "node" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signing.private_key_from_pem(path.read_bytes()).public_key() == key.private.public_key()
    # No temporary file is left beside it.
    assert sorted(p.name for p in path.parent.iterdir()) == [KEY_FILE]


def test_it_reuses_the_key_on_the_next_load(tmp_path: Path) -> None:
    first = NodeKey.load_or_create(tmp_path)
    again = NodeKey.load_or_create(tmp_path)
    assert again.fingerprint == first.fingerprint
    assert again.public_b64 == first.public_b64


def test_processes_creating_the_key_at_once_all_take_the_same_one(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from edge_runtime.identity_key import NodeKey; "
            "print(NodeKey.load_or_create(Path(sys.argv[1])).fingerprint)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "node")], stdout=subprocess.PIPE,
                              text=True) for _ in range(6)]
    printed = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert printed == {NodeKey.load_or_create(tmp_path / "node").fingerprint}
    assert [p.name for p in (tmp_path / "node").iterdir()] == [KEY_FILE]


def test_its_public_forms_are_the_raw_key_its_fingerprint_and_signatures_it_verifies(tmp_path: Path) -> None:
    key = NodeKey.load_or_create(tmp_path)
    raw = base64.b64decode(key.public_b64, validate=True)
    assert len(raw) == 32 and len(key.public_b64) == 44
    assert key.fingerprint == signing.fingerprint(raw)
    signing.public_key_from_b64(key.public_b64).verify(key.sign(b"checkpoint"), b"checkpoint")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_it_refuses_a_key_that_group_or_others_may_read(tmp_path: Path, mode: int) -> None:
    key = NodeKey.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    before = path.read_bytes()
    os.chmod(path, mode)
    with pytest.raises(StateError) as refused:
        NodeKey.load_or_create(tmp_path)
    assert f"{path} has mode {mode:04o}: group or others may read it" in str(refused.value)
    assert f"chmod 600 {path}" in str(refused.value)
    # Refused, not replaced.
    assert path.read_bytes() == before
    os.chmod(path, 0o600)
    assert NodeKey.load_or_create(tmp_path).fingerprint == key.fingerprint


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a key at all\n", "it holds no readable PEM private key"),
        (ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
         "it holds a key of another type"),
        (signing.generate_private_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")),
         "it is encrypted"),
    ],
    ids=["garbage", "p256", "encrypted"],
)
def test_it_refuses_a_file_that_is_not_an_ed25519_key(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / KEY_FILE
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(StateError) as refused:
        NodeKey.load_or_create(tmp_path)
    assert str(refused.value) == (f"{path} is not an Ed25519 private key in PEM form ({reason}); "
                                  "refusing to use or replace it")
    assert path.read_bytes() == content


def test_a_staged_key_replaces_the_key_only_when_promoted(tmp_path: Path) -> None:
    current = NodeKey.load_or_create(tmp_path)
    staged = NodeKey.load_or_create(tmp_path, next_key=True)
    assert staged.fingerprint != current.fingerprint
    # Until promoted, the node's key is the one it had, and the staged one is reused.
    assert NodeKey.load_or_create(tmp_path).fingerprint == current.fingerprint
    assert NodeKey.load_or_create(tmp_path, next_key=True).fingerprint == staged.fingerprint
    promote_next_key(tmp_path)
    assert NodeKey.load_or_create(tmp_path).fingerprint == staged.fingerprint
    assert not (tmp_path / NEXT_KEY_FILE).exists()
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


# -- the protocol -------------------------------------------------------------------


def _bad_keys() -> list[tuple[str, str]]:
    raw = signing.public_key_raw(signing.generate_private_key().public_key())
    return [
        ("not base64!", "not valid base64"),
        (base64.b64encode(raw[:31]).decode(), "an Ed25519 public key is 32 bytes, this one is 31"),
        (base64.b64encode(raw + b"\0").decode(), "an Ed25519 public key is 32 bytes, this one is 33"),
        (base64.b64encode(raw).decode().rstrip("="), "not valid base64"),
        ("A" * 200, "at most 100 characters"),
    ]


@pytest.mark.parametrize(("value", "says"), _bad_keys(), ids=["not-base64", "31-bytes", "33-bytes", "unpadded",
                                                             "long"])
@pytest.mark.parametrize("model", [EnrollRequest, SyncRequest])
def test_the_protocol_refuses_an_identity_key_that_is_not_an_ed25519_public_key(
    model: type[EnrollRequest | SyncRequest], value: str, says: str
) -> None:
    fields = {"token": "ewt_12345678", "name": "pos-1"} if model is EnrollRequest else {}
    with pytest.raises(ValidationError) as refused:
        model.model_validate({**fields, "identity_key": value})
    [error] = refused.value.errors()
    assert error["loc"] == ("identity_key",)
    assert says in error["msg"]


@pytest.mark.parametrize("model", [EnrollRequest, SyncRequest])
def test_the_protocol_takes_an_identity_key_or_none(model: type[EnrollRequest | SyncRequest],
                                                   tmp_path: Path) -> None:
    key = NodeKey.load_or_create(tmp_path)
    fields = {"token": "ewt_12345678", "name": "pos-1"} if model is EnrollRequest else {}
    assert model.model_validate({**fields, "identity_key": key.public_b64}).identity_key == key.public_b64
    assert model.model_validate(fields).identity_key is None

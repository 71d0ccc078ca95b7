"""The node's state dir: identity, the last verified desired state, status."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime import signing
from edge_runtime.protocol import Refusal
from edge_runtime.state import StateDir, StateError, Status, default_state_dir, write_atomic
from tests.edge_runtime.factories import desired, identity_for


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return signing.generate_private_key()


@pytest.fixture
def state(tmp_path: Path, key: Ed25519PrivateKey) -> StateDir:
    state = StateDir(tmp_path / "node")
    state.save_identity(identity_for(key))
    return state


def test_it_writes_the_identity_readable_by_the_owner_only(state: StateDir, key: Ed25519PrivateKey) -> None:
    assert stat.S_IMODE(state.identity_path.stat().st_mode) == 0o600
    assert state.load_identity() == identity_for(key).model_copy(
        update={"enrolled_at": state.load_identity().enrolled_at})
    # No temporary files are left behind.
    assert sorted(p.name for p in state.path.iterdir()) == ["identity.json"]


def test_it_round_trips_a_verified_desired_state(state: StateDir, key: Ed25519PrivateKey) -> None:
    signed = signing.sign_desired_state(desired(3, line="a"), key)
    state.save_desired(signed)
    loaded = state.load_desired(state.load_identity())
    assert loaded is not None
    assert loaded[0] == signed and loaded[1].generation == 3 and loaded[1].labels == {"line": "a"}


def test_it_refuses_a_tampered_desired_state_file_at_load(state: StateDir, key: Ed25519PrivateKey) -> None:
    state.save_desired(signing.sign_desired_state(desired(3, line="a"), key))
    document = json.loads(state.desired_path.read_text())
    document["payload"] = document["payload"].replace('"line":"a"', '"line":"b"')
    state.desired_path.write_text(json.dumps(document))
    with pytest.raises(StateError, match="failed verification: the desired state's signature does not match"):
        state.load_desired(state.load_identity())


def test_it_refuses_a_desired_state_file_signed_by_another_key(state: StateDir) -> None:
    state.save_desired(signing.sign_desired_state(desired(3), signing.generate_private_key()))
    with pytest.raises(StateError, match="failed verification"):
        state.load_desired(state.load_identity())


def test_it_refuses_a_desired_state_file_of_another_node(state: StateDir, key: Ed25519PrivateKey) -> None:
    state.save_desired(signing.sign_desired_state(desired(3, node_id="someone-else"), key))
    with pytest.raises(StateError, match="is for node someone-else, not this node"):
        state.load_desired(state.load_identity())


def test_it_refuses_a_garbled_desired_state_file(state: StateDir) -> None:
    state.desired_path.write_text("{not json")
    with pytest.raises(StateError, match="is not a signed desired state"):
        state.load_desired(state.load_identity())


def test_it_has_no_desired_state_before_the_first_sync(state: StateDir) -> None:
    assert state.load_desired(state.load_identity()) is None


def test_it_names_the_missing_identity(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="not enrolled: .*identity.json does not exist"):
        StateDir(tmp_path / "empty").load_identity()


def test_it_round_trips_the_status_and_survives_a_damaged_one(state: StateDir) -> None:
    status = Status(applied_generation=4, consecutive_failures=2, pending_refusals=[
        Refusal(generation=2, reason="lower than applied 4", at=dt.datetime.now(dt.UTC))])
    state.save_status(status)
    again = state.load_status()
    assert again.applied_generation == 4 and again.pending_refusals[0].reason == "lower than applied 4"
    state.status_path.write_text("garbage")
    assert state.load_status() == Status()


def test_it_replaces_files_atomically_keeping_the_old_one_when_a_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    write_atomic(target, b"old")


    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_it_takes_the_state_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEWISE_STATE_DIR", str(tmp_path / "x"))
    assert default_state_dir() == tmp_path / "x"
    monkeypatch.delenv("EDGEWISE_STATE_DIR")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / ".local" / "share" / "edgewise"
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert default_state_dir() == Path("/var/lib/edgewise")

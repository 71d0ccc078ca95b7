"""Epochs, key rotation, the floor at start-up and forward-compatible documents, on the node (no network)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime import signing
from edge_runtime.agent import Agent
from edge_runtime.protocol import (
    DesiredState,
    EnrollResponse,
    Nudge,
    SignedDesiredState,
    SyncRequest,
    SyncResponse,
)
from edge_runtime.state import StateDir
from tests.edge_runtime.factories import NODE_ID, desired, identity_for

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def state(tmp_path: Path, key: Ed25519PrivateKey) -> StateDir:
    state = StateDir(tmp_path / "node")
    state.save_identity(identity_for(key))
    return state


def in_epoch(generation: int, epoch: str, started: dt.datetime, **labels: str) -> DesiredState:
    return desired(generation, **labels).model_copy(update={"epoch": epoch, "epoch_started_at": started})


def consider(agent: Agent, signed: SignedDesiredState) -> bool:
    return asyncio.run(agent.consider(signed))


def test_it_accepts_a_later_epoch_whatever_its_generation(state: StateDir, key: Ed25519PrivateKey) -> None:
    agent = Agent(state)
    assert consider(agent, signing.sign_desired_state(in_epoch(50, "e1", T0), key))
    # A control plane restored from a backup counts from 41 again, in a new epoch.
    assert consider(agent, signing.sign_desired_state(in_epoch(41, "e2", T0 + dt.timedelta(days=1)), key))
    assert (agent.status.epoch, agent.status.highest_generation) == ("e2", 41)
    assert agent.sync_request().actual.applied_epoch == "e2"
    # Within the new epoch the floor is its own generation.
    assert not consider(agent, signing.sign_desired_state(in_epoch(40, "e2", T0 + dt.timedelta(days=1)), key))
    assert consider(agent, signing.sign_desired_state(in_epoch(42, "e2", T0 + dt.timedelta(days=1)), key))


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (lambda: in_epoch(99, "e0", T0 - dt.timedelta(days=1)), "is older than epoch e1"),
        (lambda: in_epoch(99, "e-same-time", T0), "is older than epoch e1"),
        (lambda: desired(99), "epoch (none) (started never) is older than epoch e1"),
    ],
    ids=["older-epoch", "same-start", "no-epoch"],
)
def test_it_refuses_an_older_epoch_and_keeps_serving(state: StateDir, key: Ed25519PrivateKey, document: Any,
                                                     reason: str) -> None:
    agent = Agent(state)
    assert consider(agent, signing.sign_desired_state(in_epoch(5, "e1", T0, kept="yes"), key))
    assert not consider(agent, signing.sign_desired_state(document(), key))
    assert agent.desired is not None and agent.desired.labels == {"kept": "yes"}
    assert reason in agent.status.pending_refusals[0].reason


def test_it_refuses_an_epoch_change_signed_by_another_key(state: StateDir, key: Ed25519PrivateKey) -> None:
    agent = Agent(state)
    assert consider(agent, signing.sign_desired_state(in_epoch(5, "e1", T0), key))
    forged = signing.sign_desired_state(in_epoch(1, "e9", T0 + dt.timedelta(days=9)), signing.generate_private_key())
    assert not consider(agent, forged)
    assert agent.status.epoch == "e1" and "not the pinned key" in agent.status.pending_refusals[0].reason


def test_it_reports_a_refusal_on_every_sync_until_a_state_applies(state: StateDir, key: Ed25519PrivateKey) -> None:
    agent = Agent(state)
    assert consider(agent, signing.sign_desired_state(in_epoch(8, "e1", T0), key))
    older = signing.sign_desired_state(in_epoch(3, "e1", T0), key)
    assert not consider(agent, older)
    for _ in range(3):
        # What a sync that succeeded does: the audited list empties, the standing refusal stays.
        agent.status.pending_refusals = []
        assert not consider(agent, older)
        report = agent.sync_request()
        assert report.actual.refusing is not None and report.actual.refusing.generation == 3
        assert report.refusals == [] and report.health.status == "degraded"
        assert "refusing generation 3" in report.health.message
    # It survives a restart of the node ...
    again = Agent(state)
    asyncio.run(again.load())
    assert again.sync_request().actual.refusing is not None
    # ... and ends when a state is applied.
    assert consider(again, signing.sign_desired_state(in_epoch(9, "e1", T0), key))
    assert again.sync_request().actual.refusing is None and "refusing" not in again.health().message


def test_it_ends_a_refusal_when_the_control_plane_offers_the_applied_state_again(state: StateDir,
                                                                                 key: Ed25519PrivateKey) -> None:
    agent = Agent(state)
    applied = signing.sign_desired_state(in_epoch(4, "e1", T0), key)
    assert consider(agent, applied)
    assert not consider(agent, signing.sign_desired_state(in_epoch(5, "e1", T0), signing.generate_private_key()))
    assert agent.sync_request().actual.refusing is not None
    # The forged offer is gone: the control plane offers what the node holds.
    assert not consider(agent, applied)
    assert agent.sync_request().actual.refusing is None and state.load_status().refusing is None


def test_it_refuses_an_older_signed_state_copied_onto_disk_at_start(state: StateDir, key: Ed25519PrivateKey) -> None:
    old = signing.sign_desired_state(in_epoch(3, "e1", T0, old="yes"), key)
    agent = Agent(state)
    assert consider(agent, old)
    assert consider(agent, signing.sign_desired_state(in_epoch(7, "e1", T0, new="yes"), key))
    # Someone puts the older, validly signed document back.
    state.desired_path.write_text(old.model_dump_json())
    restarted = Agent(state)
    asyncio.run(restarted.load())
    assert restarted.desired is None and restarted.status.applied_generation == 0
    [refusal] = restarted.status.pending_refusals
    assert refusal.generation == 3 and "desired state on disk refused" in refusal.reason
    assert "lower than applied 7" in refusal.reason
    assert restarted.sync_request().actual.refusing is not None


def test_it_refuses_a_state_from_an_older_epoch_on_disk_at_start(state: StateDir, key: Ed25519PrivateKey) -> None:
    old = signing.sign_desired_state(in_epoch(90, "e1", T0), key)
    agent = Agent(state)
    assert consider(agent, old)
    assert consider(agent, signing.sign_desired_state(in_epoch(2, "e2", T0 + dt.timedelta(hours=1)), key))
    state.desired_path.write_text(old.model_dump_json())
    restarted = Agent(state)
    asyncio.run(restarted.load())
    assert restarted.desired is None
    assert "older than epoch e2" in restarted.status.pending_refusals[0].reason


def test_it_keeps_its_floor_through_a_power_cut(state: StateDir, key: Ed25519PrivateKey,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A power cut cannot be produced here: the test checks the write that raises the floor asks for fsync.
    writes: list[bool] = []
    original = StateDir.save_status

    def spy(self: StateDir, status: Any, *, durable: bool = False) -> None:
        writes.append(durable)
        original(self, status, durable=durable)

    monkeypatch.setattr(StateDir, "save_status", spy)
    agent = Agent(state)
    assert consider(agent, signing.sign_desired_state(in_epoch(4, "e1", T0), key))
    # The write that raised the floor was made durable (fsync), not left in the page cache.
    assert True in writes


class KeyUser:
    """A reconciler that verifies with the control plane's key, as the model store does."""

    name = "key-user"

    def __init__(self) -> None:
        self.keys: list[Ed25519PublicKey] = []

    async def reconcile(self, desired: DesiredState) -> dict[str, Any]:
        return {}

    def pin_key(self, public_key: Ed25519PublicKey) -> None:
        self.keys.append(public_key)


def raw(key: Ed25519PrivateKey) -> bytes:
    return signing.public_key_raw(key.public_key())


def test_it_follows_a_key_rotation_and_pins_the_new_key(state: StateDir, key: Ed25519PrivateKey) -> None:
    user = KeyUser()
    agent = Agent(state, reconcilers=[user])
    assert consider(agent, signing.sign_desired_state(in_epoch(3, "e1", T0), key))
    second, third = signing.generate_private_key(), signing.generate_private_key()
    chain = [signing.endorse_key(second.public_key(), key, issued_at=T0 + dt.timedelta(days=1)),
             signing.endorse_key(third.public_key(), second, issued_at=T0 + dt.timedelta(days=2))]
    # Two rotations happened while the node was away: it walks the whole chain.
    rotated = signing.sign_desired_state(in_epoch(1, "e3", T0 + dt.timedelta(days=2)), third, chain)
    assert consider(agent, rotated)
    identity = state.load_identity()
    assert identity.signing_key_fingerprint == signing.fingerprint(raw(third))
    assert [signing.public_key_raw(k) for k in user.keys] == [raw(third)]
    # From now on only the new key is trusted: a state signed by the old key is refused.
    assert not consider(agent, signing.sign_desired_state(in_epoch(2, "e3", T0 + dt.timedelta(days=2)), key))
    assert consider(agent, signing.sign_desired_state(in_epoch(2, "e3", T0 + dt.timedelta(days=2)), third))
    # A restarted node loads the state with the key it pinned.
    again = Agent(state)
    asyncio.run(again.load())
    assert again.status.applied_generation == 2


def test_it_pins_at_start_a_key_it_stored_a_state_of_but_did_not_pin(state: StateDir, key: Ed25519PrivateKey) -> None:
    second = signing.generate_private_key()
    chain = [signing.endorse_key(second.public_key(), key, issued_at=T0)]
    # The node stored the rotated state and stopped before it pinned the new key.
    state.save_desired(signing.sign_desired_state(in_epoch(1, "e2", T0), second, chain))
    user = KeyUser()
    agent = Agent(state, reconcilers=[user])
    asyncio.run(agent.load())
    assert agent.status.applied_generation == 1
    assert state.load_identity().signing_key_fingerprint == signing.fingerprint(raw(second))
    assert len(user.keys) == 1


@pytest.mark.parametrize("tamper", ["key", "signature", "fingerprint", "by-stranger"])
def test_it_refuses_a_forged_endorsement(state: StateDir, key: Ed25519PrivateKey, tamper: str) -> None:
    agent = Agent(state)
    assert consider(agent, signing.sign_desired_state(in_epoch(3, "e1", T0), key))
    attacker, other = signing.generate_private_key(), signing.generate_private_key()
    endorsement = signing.endorse_key(attacker.public_key(), key if tamper != "by-stranger" else other, issued_at=T0)
    if tamper == "key":
        # A genuine endorsement of another key, with the attacker's key swapped in.
        genuine = signing.endorse_key(other.public_key(), key, issued_at=T0)
        endorsement = genuine.model_copy(update={"public_key": endorsement.public_key,
                                                 "fingerprint": endorsement.fingerprint})
    elif tamper == "signature":
        endorsement = endorsement.model_copy(update={"signature": signing.endorse_key(
            attacker.public_key(), attacker, issued_at=T0).signature})
    elif tamper == "fingerprint":
        endorsement = endorsement.model_copy(update={"fingerprint": signing.fingerprint(raw(other))})
    if tamper == "by-stranger":
        endorsement = endorsement.model_copy(update={"previous_fingerprint": signing.fingerprint(raw(key))})
    signed = signing.sign_desired_state(in_epoch(1, "e9", T0 + dt.timedelta(days=1)), attacker, [endorsement])
    assert not consider(agent, signed)
    assert agent.status.epoch == "e1"
    assert state.load_identity().signing_key_fingerprint == signing.fingerprint(raw(key))


# -- forward compatibility ----------------------------------------------------------


def newer(document: dict[str, Any]) -> dict[str, Any]:
    """What a newer control plane might send: fields this node has never heard of, at every level."""
    return {**document, "added_in_a_later_release": {"anything": [1, 2, 3]}}


def test_it_accepts_a_newer_desired_state_with_fields_it_does_not_know(state: StateDir, key: Ed25519PrivateKey,
                                                                       ) -> None:
    payload = newer(in_epoch(2, "e1", T0, a="b").model_dump(mode="json"))
    payload["models"] = [newer({"name": "m", "version": "1", "sha256": "0" * 64, "size": 1,
                                "signature": "c2ln", "future_knob": True})]
    text = signing.canonical_json(payload)
    # Signed over the exact bytes, unknown fields included.
    signed = SignedDesiredState.model_validate(newer({
        "payload": text, "signature": base64.b64encode(key.sign(text.encode())).decode(),
        "key_fingerprint": signing.fingerprint(raw(key))}))
    agent = Agent(state)
    assert consider(agent, signed)
    assert agent.desired is not None and agent.desired.labels == {"a": "b"} and agent.desired.models[0].name == "m"
    # Changing an unknown field breaks the signature like any other byte.
    forged = signed.model_copy(update={"payload": text.replace("[1,2,3]", "[1,2,4]")})
    assert not consider(Agent(state), forged)


def test_it_accepts_newer_answers_and_messages() -> None:
    sync = SyncResponse.model_validate_json(json.dumps(newer({"protocol": 1, "generation": 3, "sync_interval_s": 5,
                                                              "queries": [newer({"query_id": "q1", "spec": {}})]})))
    assert sync.generation == 3 and sync.queries[0].query_id == "q1"
    enrolled = EnrollResponse.model_validate(newer({
        "node_id": NODE_ID, "site": "s", "credential": "c", "signing_public_key": "k",
        "signing_key_fingerprint": "f", "sync_interval_s": 5}))
    assert enrolled.site == "s"
    assert Nudge.model_validate(newer({"type": "sync", "generation": 4})).generation == 4


def test_it_stays_strict_about_what_the_control_plane_accepts() -> None:
    with pytest.raises(ValueError, match="added_in_a_later_release"):
        SyncRequest.model_validate(newer({}))

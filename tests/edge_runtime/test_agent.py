"""What the agent accepts and refuses, on real files with real keys (no network)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime import signing
from edge_runtime.agent import Agent
from edge_runtime.audit import NodeAudit
from edge_runtime.protocol import DesiredState, ModelStatus, Refusal, SignedDesiredState, report_digest
from edge_runtime.state import StateDir
from tests.edge_runtime.factories import desired, identity_for


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return signing.generate_private_key()


@pytest.fixture
def state(tmp_path: Path, key: Ed25519PrivateKey) -> StateDir:
    state = StateDir(tmp_path / "node")
    state.save_identity(identity_for(key))
    return state


def consider(agent: Agent, signed: SignedDesiredState) -> bool:
    return asyncio.run(agent.consider(signed))


def test_it_applies_a_newer_signed_state_and_persists_it(state: StateDir, key: Ed25519PrivateKey) -> None:
    agent = Agent(state)
    assert consider(agent, signing.sign_desired_state(desired(1, a="1"), key))
    assert consider(agent, signing.sign_desired_state(desired(2, a="2"), key))
    assert agent.status.applied_generation == 2 and agent.status.pending_refusals == []
    assert state.load_status().applied_generation == 2
    loaded = state.load_desired(state.load_identity())
    assert loaded is not None and loaded[1].labels == {"a": "2"}
    # The same document again is no change and no refusal.
    assert not consider(agent, loaded[0])
    assert agent.status.pending_refusals == []


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda key: signing.sign_desired_state(desired(5), signing.generate_private_key()), "not the pinned key"),
        (lambda key: signing.sign_desired_state(desired(5, node_id="other"), key), "addressed to node other"),
        (lambda key: signing.sign_desired_state(desired(2), key), "lower than applied 3"),
        (lambda key: signing.sign_desired_state(desired(3, changed="yes"), key),
         "generation 3 is already applied with different content"),
    ],
    ids=["other-key", "other-node", "lower", "same-generation-other-content"],
)
def test_it_refuses_and_keeps_its_state(state: StateDir, key: Ed25519PrivateKey, make: Any, reason: str) -> None:
    agent = Agent(state)
    assert consider(agent, signing.sign_desired_state(desired(3, kept="yes"), key))
    signed = make(key)
    assert not consider(agent, signed)
    [refusal] = agent.status.pending_refusals
    assert reason in refusal.reason
    assert agent.status.applied_generation == 3
    assert agent.desired is not None and agent.desired.labels == {"kept": "yes"}
    on_disk = state.load_desired(state.load_identity())
    assert on_disk is not None and on_disk[1].labels == {"kept": "yes"}
    assert state.load_status().pending_refusals == agent.status.pending_refusals
    # Offered again (as the control plane does on every sync), it is not reported twice.
    assert not consider(agent, signed)
    assert len(agent.status.pending_refusals) == 1
    assert agent.health().status == "degraded"


def test_it_refuses_a_forged_payload_with_a_reused_signature(state: StateDir, key: Ed25519PrivateKey) -> None:
    agent = Agent(state)
    genuine = signing.sign_desired_state(desired(4), key)
    forged = SignedDesiredState(payload=genuine.payload.replace('"generation":4', '"generation":9'),
                                signature=genuine.signature, key_fingerprint=genuine.key_fingerprint)
    assert not consider(agent, forged)
    [refusal] = agent.status.pending_refusals
    assert refusal.generation == 9 and "signature does not match" in refusal.reason
    assert agent.status.applied_generation == 0


def test_it_loads_the_verified_state_from_disk_at_start(state: StateDir, key: Ed25519PrivateKey) -> None:
    first = Agent(state)
    consider(first, signing.sign_desired_state(desired(6, x="y"), key))
    again = Agent(state)
    asyncio.run(again.load())
    assert again.status.applied_generation == 6 and again.desired is not None and again.desired.labels == {"x": "y"}
    assert again.sync_request().actual.applied_generation == 6


def test_it_refuses_a_tampered_file_at_start_but_not_an_older_generation_later(
    state: StateDir, key: Ed25519PrivateKey
) -> None:
    consider(Agent(state), signing.sign_desired_state(desired(6), key))
    document = json.loads(state.desired_path.read_text())
    document["payload"] = document["payload"].replace('"site":"plant-berlin"', '"site":"elsewhere"')
    state.desired_path.write_text(json.dumps(document))
    agent = Agent(state)
    asyncio.run(agent.load())
    [refusal] = agent.status.pending_refusals
    assert refusal.generation == 6 and "desired state on disk refused" in refusal.reason
    # Nothing verified is applied, so the control plane is asked for the state again ...
    assert agent.sync_request().actual.applied_generation == 0
    assert agent.health().status == "degraded"
    # ... but an older generation is still refused: the floor survived the bad file.
    assert not consider(agent, signing.sign_desired_state(desired(5), key))
    assert consider(agent, signing.sign_desired_state(desired(6), key))
    assert agent.status.applied_generation == 6


class Recorder:
    name = "recorder"

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[int] = []
        self.fail = fail

    async def reconcile(self, desired: DesiredState) -> dict[str, Any]:
        self.seen.append(desired.generation)
        if self.fail:
            raise RuntimeError("model file missing")
        return {"generation": desired.generation}


def test_it_runs_reconcilers_and_reports_their_detail(state: StateDir, key: Ed25519PrivateKey) -> None:
    recorder = Recorder()
    agent = Agent(state, reconcilers=[recorder])
    consider(agent, signing.sign_desired_state(desired(1), key))
    assert recorder.seen == [1]
    assert agent.sync_request().actual.detail == {"recorder": {"generation": 1}}
    failing = Recorder(fail=True)
    agent = Agent(state, reconcilers=[failing])
    asyncio.run(agent.load())
    assert agent.sync_request().actual.detail == {"recorder": {"error": "RuntimeError: model file missing"}}
    health = agent.health()
    assert health.status == "degraded" and "model file missing" in health.message


class Serving(Recorder):
    name = "models"

    def model_status(self) -> list[ModelStatus]:
        return [ModelStatus(name="defects", version=str(g), state="serving") for g in self.seen]


def test_it_reports_what_serves_from_reconcilers_that_know(state: StateDir, key: Ed25519PrivateKey) -> None:
    serving = Serving()
    agent = Agent(state, reconcilers=[serving, Recorder()])
    consider(agent, signing.sign_desired_state(desired(2), key))
    actual = agent.sync_request().actual
    assert [(m.name, m.version, m.state) for m in actual.models] == [("defects", "2", "serving")]
    assert actual.detail == {"models": {"generation": 2}, "recorder": {"generation": 2}}


def test_it_sends_a_brief_sync_only_while_the_control_plane_holds_this_very_report(state: StateDir) -> None:
    agent = Agent(state, audit=NodeAudit.in_state_dir(state.path))
    first = agent.sync_request()
    assert not first.brief and first.digest == report_digest(first)  # nothing held yet: the whole report
    agent.held_digest = first.digest
    assert agent.sync_request().brief is True  # the audit log is empty, so there is nothing to upload
    brief = agent.sync_request()
    assert brief.digest == first.digest and brief.hardware is None and brief.actual.models == []
    # Something to upload (an audit entry the control plane lacks): the whole report, with the upload.
    agent.record("model.load", {"model": "m"})
    full = agent.sync_request()
    assert not full.brief and full.audit is not None and full.audit.entries
    # Its report changed: the digest no longer matches what is held.
    fresh = Agent(state)
    fresh.held_digest = first.digest
    fresh.detail["extra"] = {"x": 1}
    assert not fresh.sync_request().brief
    # A nudge, or a refusal waiting to be reported, sends the whole report once.
    fresh.detail.clear()
    fresh.full_next = True
    assert not fresh.sync_request().brief and fresh.sync_request().brief
    refused_at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    fresh.status.pending_refusals.append(Refusal(generation=9, reason="test", at=refused_at))
    assert not fresh.sync_request().brief

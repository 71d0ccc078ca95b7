"""The control plane's signing key, its rotation and the epochs its generations count in (PostgreSQL, no processes)."""

from __future__ import annotations

import datetime as dt
import io
import logging
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol, signing
from models_registry.models import ModelVersion
from models_registry.node_feature import ModelsFeature
from orchestrator import keys, rotation
from orchestrator.desired_state import GENERATION_MAX, desired_state_publish
from orchestrator.models import DesiredState, Epoch, SigningKey
from sites import services
from sites.models import Node, Site
from sites.sync import MAX_AHEAD
from tests.fixtures.processes import BIN, control_plane_env
from tests.models_registry.helpers import valid_version

pytestmark = pytest.mark.django_db


@pytest.fixture
def key_path(tmp_path: Path, settings: Any) -> Path:
    """A signing key file of this test's own, so that tests can remove and replace it.

    The keys and epochs other processes recorded (the session's control plane)
    are set aside within this test's transaction: this is a control plane of its own.
    """
    settings.SIGNING_KEY_PATH = tmp_path / "keys" / "signing_key.pem"
    SigningKey.objects.all().delete()
    Epoch.objects.all().delete()
    keys.forget()
    yield settings.SIGNING_KEY_PATH
    keys.forget()


@pytest.fixture
def node(site_berlin: Site) -> tuple[Node, str]:
    _, token = services.token_create(actor=Actor.system("test"), site=site_berlin)
    node, credential = services.node_enroll(
        request=protocol.EnrollRequest(token=token, name="gw-1", role="gateway"), ip="127.0.0.1")
    return node, credential


def sync(credential: str, node: Node, **actual: Any) -> dict[str, Any]:
    body = protocol.SyncRequest(actual=protocol.ActualState(**actual)).model_dump_json()
    response = Client().post(f"/agent/v1/nodes/{node.uuid}/sync", body, content_type="application/json",
                             headers={"authorization": f"Bearer {credential}"})
    assert response.status_code == 200, response.content
    return response.json()


@pytest.mark.django_db(transaction=True)
def test_it_creates_the_key_on_a_first_start_and_says_so(key_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The start-up check runs in a thread of its own (and commits there): the test's data is committed too.
    with caplog.at_level(logging.WARNING, logger="edgewise.keys"):
        trust = keys.check_at_startup()
    assert key_path.exists() and (key_path.stat().st_mode & 0o777) == 0o600
    assert f"created a new signing key at {key_path}" in caplog.text
    [row] = SigningKey.objects.all()
    assert row.fingerprint == trust.fingerprint and row.retired_at is None and row.endorsement is None
    assert Epoch.objects.get().uuid.hex == trust.epoch.replace("-", "")


def test_it_refuses_to_start_when_the_key_it_signed_with_is_missing(key_path: Path, node: tuple[Node, str]) -> None:
    keys.current()
    key_path.unlink()
    keys.forget()
    with pytest.raises(keys.SigningKeyError, match=f"signing key {key_path} .* is missing.*restore the file"):
        keys.current()
    # Nothing was created in its place.
    assert not key_path.exists() and SigningKey.objects.count() == 1
    with pytest.raises(keys.SigningKeyError, match="is missing"):
        desired_state_publish(node=node[0], actor=Actor.system("test"))


def test_it_refuses_a_key_file_that_holds_another_key(key_path: Path) -> None:
    keys.current()
    key_path.unlink()
    keys.write_key_file(key_path, signing.generate_private_key())
    keys.forget()
    with pytest.raises(keys.SigningKeyError, match=f"{key_path} .* holds an unknown key"):
        keys.current()


def test_it_starts_the_first_epoch_of_a_database_with_the_existing_key(key_path: Path) -> None:
    keys.write_key_file(key_path, signing.generate_private_key())
    trust = keys.current()
    # A control plane that ran before keys were recorded (or on a new database) records its key.
    assert SigningKey.objects.get().fingerprint == trust.fingerprint
    assert Epoch.objects.get().reason == "first signature on this database"


def test_it_answers_a_node_that_is_ahead_after_a_restore_above_what_it_holds(node: tuple[Node, str]) -> None:
    db, credential = node
    first = sync(credential, db)
    epoch = keys.current().epoch
    # A restored database holds generation 1; the node applied 40 in the same epoch before the restore.
    answer = sync(credential, db, applied_generation=40, applied_epoch=epoch)
    state = signing.verify_desired_state(protocol.SignedDesiredState.model_validate(answer["desired"]),
                                         signing.public_key_from_b64(keys.public_key_b64()))
    assert first["generation"] == 1 and answer["generation"] == 41 == state.generation and state.epoch == epoch
    assert DesiredState.objects.get(node=db).generation == 41
    # Ahead in another epoch means nothing here: that node gets the current epoch's state as it is.
    again = sync(credential, db, applied_generation=500, applied_epoch="some-other-epoch")
    assert again["generation"] == 41


def test_it_starts_a_new_epoch_and_republishes_every_node(node: tuple[Node, str]) -> None:
    db, credential = node
    sync(credential, db)
    before = keys.current()
    out = call_command_output("epoch_start", "--reason", "restored the backup of 1 December")
    after = keys.current()
    assert after.epoch != before.epoch and after.epoch_started_at > before.epoch_started_at
    assert f"started epoch {after.epoch}" in out
    row = DesiredState.objects.get(node=db)
    assert row.epoch == after.epoch and row.generation == 2
    state = protocol.DesiredState.model_validate_json(row.payload)
    assert state.epoch == after.epoch and state.epoch_started_at is not None
    event = AuditEvent.objects.get(action="epoch.start")
    assert event.after["reason"] == "restored the backup of 1 December"


def test_it_refuses_an_epoch_without_a_reason() -> None:
    with pytest.raises(ValueError, match="say why"):
        rotation.epoch_start(actor=Actor.system("test"), reason="  ")


def call_command_output(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_it_rotates_the_key_so_that_a_node_pinned_to_the_old_one_follows(
    key_path: Path, node: tuple[Node, str]
) -> None:
    db, credential = node
    old = keys.current()
    old_public = signing.public_key_from_b64(keys.public_key_b64())
    version = valid_version()
    assert signing.verify_artifact(version.sha256, version.signature, old_public) is None

    out = call_command_output("signing_key_rotate")
    new = keys.current()
    assert new.fingerprint != old.fingerprint and new.epoch != old.epoch
    assert f"{old.fingerprint[:16]} -> {new.fingerprint[:16]}" in out
    # The old key is kept beside the new one, the new one is in place, both owner-only.
    retired = key_path.with_name(f"{key_path.name}.retired-{old.fingerprint[:16]}")
    assert retired.exists() and (key_path.stat().st_mode & 0o777) == 0o600
    assert signing.fingerprint(signing.public_key_raw(
        signing.private_key_from_pem(key_path.read_bytes()).public_key())) == new.fingerprint
    rows = list(SigningKey.objects.order_by("created_at"))
    assert [r.retired_at is not None for r in rows] == [True, False]
    # Artifacts are signed again with the new key.
    version.refresh_from_db()
    new_public = signing.public_key_from_b64(keys.public_key_b64())
    signing.verify_artifact(version.sha256, version.signature, new_public)
    with pytest.raises(signing.SignatureError):
        signing.verify_artifact(version.sha256, version.signature, old_public)
    # A node that pinned the old key verifies its way to the new one.
    answer = protocol.SignedDesiredState.model_validate(sync(credential, db)["desired"])
    state, endorsement = signing.verify_with_chain(answer, pinned_fingerprint=old.fingerprint, pinned_key=old_public)
    assert endorsement is not None and endorsement.fingerprint == new.fingerprint
    assert state.epoch == new.epoch
    assert AuditEvent.objects.get(action="signing_key.rotate").after["key"] == new.fingerprint


def test_it_finishes_a_rotation_that_stopped_before_the_file_moved(key_path: Path) -> None:
    old = keys.current()
    new_key = signing.generate_private_key()
    pending = key_path.with_name(f"{key_path.name}.next")
    keys.write_key_file(pending, new_key)
    new_fp = signing.fingerprint(signing.public_key_raw(new_key.public_key()))
    # The database switched (as a rotation's transaction does) but the process stopped before the rename.
    SigningKey.objects.filter(fingerprint=old.fingerprint).update(retired_at=Epoch.objects.get().started_at)
    endorsement = signing.endorse_key(new_key.public_key(), old.key, issued_at=Epoch.objects.get().started_at)
    SigningKey.objects.create(fingerprint=new_fp, public_key=endorsement.public_key,
                              endorsement=endorsement.model_dump(mode="json"), created_at=endorsement.issued_at)
    keys.forget()
    assert keys.current().fingerprint == new_fp
    assert not pending.exists() and key_path.with_name(f"{key_path.name}.retired-{old.fingerprint[:16]}").exists()


def test_it_leaves_the_old_key_when_a_rotation_fails(key_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = keys.current()

    def broken(*_: Any, **__: Any) -> int:
        raise RuntimeError("disk full")

    # A failure inside the rotation's transaction cannot be produced otherwise.
    monkeypatch.setattr(ModelsFeature, "sign_again", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        rotation.signing_key_rotate(actor=Actor.system("test"))
    keys.forget()
    assert keys.current().fingerprint == old.fingerprint
    assert not key_path.with_name(f"{key_path.name}.next").exists()
    assert SigningKey.objects.get().retired_at is None


@pytest.mark.process
@pytest.mark.django_db(transaction=True)
def test_it_stops_a_control_plane_process_whose_key_is_missing(node: tuple[Node, str], tmp_path: Path) -> None:
    keys.current()  # the session's key signs, and the database remembers it
    env = control_plane_env(EDGEWISE_SIGNING_KEY_PATH=str(tmp_path / "gone.pem"))
    commands = {
        "the ASGI application": [sys.executable, "-c", "import orchestrator.asgi"],
        "a Celery worker": [str(BIN / "celery"), "-A", "orchestrator", "worker", "--pool", "solo",
                            "-Q", f"never-{tmp_path.name}", "-l", "warning"],
    }
    for what, command in commands.items():
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode != 0, what
        assert f"signing key {tmp_path / 'gone.pem'} (EDGEWISE_SIGNING_KEY_PATH) is missing" in done.stderr, what
    assert not (tmp_path / "gone.pem").exists()


def test_it_refuses_to_make_a_key_on_an_upgraded_database_that_already_signed(key_path: Path,
                                                                             node: tuple[Node, str]) -> None:
    desired_state_publish(node=node[0], actor=Actor.system("test"))
    # A control plane from before keys were recorded: signed states, no key rows, and the file lost.
    SigningKey.objects.all().delete()
    Epoch.objects.all().delete()
    key_path.unlink()
    keys.forget()
    with pytest.raises(keys.SigningKeyError, match=f"{key_path} .* is missing, but this database holds desired"):
        keys.current()
    assert not key_path.exists()
    # Nor does it take on another key in its place.
    keys.write_key_file(key_path, signing.generate_private_key())
    with pytest.raises(keys.SigningKeyError, match="holds desired states signed with key"):
        keys.current()


def test_it_takes_on_the_rotated_key_when_the_database_is_restored_from_before_the_rotation(
    key_path: Path, node: tuple[Node, str]
) -> None:
    db, credential = node
    old = keys.current()
    version = valid_version()
    rotation.signing_key_rotate(actor=Actor.system("test"))
    new = keys.current()
    # The backup knew only the old key (the file beside it holds the new one, which nodes pinned).
    SigningKey.objects.filter(fingerprint=new.fingerprint).delete()
    SigningKey.objects.filter(fingerprint=old.fingerprint).update(retired_at=None)
    Epoch.objects.exclude(key_fingerprint=old.fingerprint).delete()
    ModelVersion.objects.filter(pk=version.pk).update(signature=signing.sign_artifact(version.sha256, old.key))
    keys.forget()
    trust = keys.current()
    assert trust.fingerprint == new.fingerprint and trust.epoch != old.epoch
    assert SigningKey.objects.get(retired_at__isnull=True).fingerprint == new.fingerprint
    version.refresh_from_db()
    signing.verify_artifact(version.sha256, version.signature, signing.public_key_from_b64(keys.public_key_b64()))
    # A node that pinned the new key gets states it verifies with that key.
    answer = protocol.SignedDesiredState.model_validate(sync(credential, db)["desired"])
    assert answer.key_fingerprint == new.fingerprint


def test_it_believes_a_node_ahead_of_the_database_only_within_bounds(node: tuple[Node, str]) -> None:
    db, credential = node
    sync(credential, db)
    epoch = keys.current().epoch
    claim = 1 + MAX_AHEAD + 1
    assert sync(credential, db, applied_generation=claim, applied_epoch=epoch)["generation"] == 1


def test_it_publishes_the_other_nodes_when_one_has_no_generation_left(site_berlin: Site,
                                                                      node: tuple[Node, str]) -> None:
    db, _ = node
    _, token = services.token_create(actor=Actor.system("test"), site=site_berlin)
    other, _ = services.node_enroll(request=protocol.EnrollRequest(token=token, name="gw-2"), ip=None)
    desired_state_publish(node=db, actor=Actor.system("test"))
    DesiredState.objects.filter(node=db).update(generation=GENERATION_MAX)
    before = DesiredState.objects.get(node=other).generation
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"line": "9"})
    assert DesiredState.objects.get(node=other).generation == before + 1
    assert DesiredState.objects.get(node=db).generation == GENERATION_MAX


def test_it_says_what_to_do_when_a_refusing_node_is_in_an_epoch_it_does_not_know(
    node: tuple[Node, str], caplog: pytest.LogCaptureFixture
) -> None:
    db, credential = node
    refusal = protocol.Refusal(generation=1, reason="older than epoch", at=dt.datetime.now(dt.UTC))
    with caplog.at_level(logging.ERROR, logger="edgewise.sites"):
        sync(credential, db, applied_generation=7, applied_epoch=keys.current().epoch, refusing=refusal)
        assert "does not know" not in caplog.text
        sync(credential, db, applied_generation=7, applied_epoch=str(uuid.uuid4()), refusing=refusal)
    assert "which this database does not know" in caplog.text and "manage.py epoch_start" in caplog.text

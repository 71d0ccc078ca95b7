"""The checkpointer, the anchor file, the public checkpoint and concurrent appends with real PostgreSQL."""

from __future__ import annotations

import io
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.test import Client

from audit import anchors
from audit.checkpoints import checkpoint_take
from audit.log_key import AuditKeyError, log_key
from audit.models import AuditCheckpoint, AuditEvent, AuditLogLeaf, AuditPending
from audit.services import Actor, audit_record, audit_verify
from edge_runtime import merkle, notes

pytestmark = pytest.mark.usefixtures("audit_dirs")


def append(label: str) -> AuditEvent:
    with transaction.atomic():
        return audit_record(actor=Actor.system("test"), action=f"test.{label}")


@pytest.mark.django_db
def test_it_signs_a_checkpoint_only_when_the_log_grew(django_capture_on_commit_callbacks: Any) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        first = checkpoint_take()  # an empty log gets its first checkpoint too
    assert first is not None and first.size == 0 and first.root == merkle.EMPTY_ROOT.hex()
    assert checkpoint_take() is None
    leaves = [merkle.leaf_hash(append(str(i)).leaf_data()) for i in range(3)]
    with django_capture_on_commit_callbacks(execute=True):
        second = checkpoint_take()
    assert second is not None and second.size == 3 and second.root == merkle.root_of(leaves).hex()
    key = log_key()
    note, checkpoint = notes.open_checkpoint(second.note, key.name, key.public)
    assert (checkpoint.origin, checkpoint.size, checkpoint.root.hex()) == (key.name, 3, second.root)
    assert notes.verify_cosignature(note, key.name, key.public) > 0
    anchored = anchors.anchors_read(anchors.anchor_path(), [key.vkey])
    assert [a.checkpoint.size for a in anchored] == [0, 3] and anchored[1].note == second.note


@pytest.mark.django_db
def test_it_keeps_the_anchor_file_owner_only_with_the_key_in_its_header(
        django_capture_on_commit_callbacks: Any) -> None:
    append("one")
    with django_capture_on_commit_callbacks(execute=True):
        checkpoint_take()
    path = anchors.anchor_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text().startswith(anchors.header(log_key().vkey))
    other = notes.vkey("other.example/log", log_key().public)
    with pytest.raises(anchors.AnchorError, match="not a key of this log"):
        anchors.anchors_read(path, [other])
    with pytest.raises(anchors.AnchorError, match="not of this log's key"):
        anchors.anchor_append("x", other)


@pytest.mark.django_db
def test_it_refuses_a_missing_key_once_the_log_has_signed(audit_dirs: Path) -> None:
    checkpoint_take()
    log_key().private  # noqa: B018  (made by the first checkpoint)
    (audit_dirs / "audit_log_key.pem").unlink()
    append("after")
    with pytest.raises(AuditKeyError, match="audit_log_key.pem is missing"):
        checkpoint_take()
    with pytest.raises(CommandError, match="is missing"):
        call_command("audit_verify")


@pytest.mark.django_db
def test_it_serves_the_latest_checkpoint_to_anyone(client: Client) -> None:
    response = client.get("/audit/checkpoint")
    assert response.status_code == 404 and response["Content-Type"].startswith("text/plain")
    assert b"no checkpoint yet" in response.content and response["Cache-Control"] == "no-store"
    append("one")
    checkpoint_take()
    response = client.get("/audit/checkpoint")
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    assert response["Content-Type"].startswith("text/plain")
    name, public = notes.parse_vkey(log_key().vkey)
    _, checkpoint = notes.open_checkpoint(response.content.decode(), name, public)
    assert checkpoint.size == AuditLogLeaf.objects.count() == AuditCheckpoint.objects.get().size


@pytest.mark.django_db
def test_it_serves_the_log_keys_vkey_to_anyone_once_the_key_exists(client: Client) -> None:
    response = client.get("/audit/vkey")
    assert response.status_code == 404 and b"no key yet" in response.content
    append("one")
    checkpoint_take()
    response = client.get("/audit/vkey")
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    assert response.content.decode() == log_key().vkey + "\n"
    name, public = notes.parse_vkey(response.content.decode().strip())
    notes.open_checkpoint(client.get("/audit/checkpoint").content.decode(), name, public)


@pytest.mark.django_db
def test_it_exports_the_checkpoints_as_an_anchor_that_audit_verify_takes(tmp_path: Path) -> None:
    append("one")
    checkpoint_take()
    append("two")
    checkpoint_take()
    every, latest = tmp_path / "every.log", tmp_path / "latest.log"
    call_command("audit_checkpoint_export", str(every), stdout=io.StringIO())
    call_command("audit_checkpoint_export", str(latest), "--latest", stdout=io.StringIO())
    key = log_key().vkey
    assert [a.checkpoint.size for a in anchors.anchors_read(every, [key])] == [1, 2]
    assert [a.checkpoint.size for a in anchors.anchors_read(latest, [key])] == [2]
    with pytest.raises(CommandError, match="exists"):
        call_command("audit_checkpoint_export", str(every))
    out = io.StringIO()
    call_command("audit_verify", "--anchor", str(every), stdout=out)
    assert "audit log intact: 2 records verified, 4 signed checkpoints compared (1 anchor files)" in out.getvalue()


@pytest.mark.django_db
def test_it_asks_for_a_checkpoint_after_the_configured_number_of_appends(
        settings: Any, django_capture_on_commit_callbacks: Any) -> None:
    import json

    import redis

    from audit import services
    from audit.tasks import checkpoint_take_task

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    queue = settings.CELERY_TASK_DEFAULT_QUEUE
    broker.delete(queue)
    settings.AUDIT_CHECKPOINT_ENTRIES = 3
    services._appends.count = 0  # this process's count so far (earlier tests appended too)
    with django_capture_on_commit_callbacks(execute=True):
        for i in range(5):
            append(str(i))
    # The third commit asked for one checkpoint (on the run's own queue); the next three would ask again.
    messages = [json.loads(m) for m in broker.lrange(queue, 0, -1)]
    broker.delete(queue)
    assert [m["headers"]["task"] for m in messages] == [services.CHECKPOINT_TASK]
    assert checkpoint_take_task() == 5 and not AuditPending.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_append_waits_for_no_other_transaction() -> None:
    held, release = threading.Event(), threading.Event()

    def slow() -> None:
        try:
            with transaction.atomic():
                audit_record(actor=Actor.system("test"), action="test.slow")
                held.set()
                release.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        assert held.wait(10)
        done = threading.Event()

        def quick() -> None:
            try:
                append("quick")
                done.set()
            finally:
                connection.close()

        other = threading.Thread(target=quick)
        other.start()
        # Under the old chain head's row lock this append would wait for the slow transaction to end.
        assert done.wait(5), "an append waited for another transaction"
        other.join()
    finally:
        release.set()
        thread.join()


@pytest.mark.django_db(transaction=True)
def test_concurrent_appends_make_a_gap_free_log_of_exactly_the_committed_events() -> None:
    committed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(n: int) -> None:
        try:
            for i in range(25):
                try:
                    with transaction.atomic():
                        event = audit_record(actor=Actor.system("test"), action="test.concurrent",
                                             object_repr=f"{n}-{i}")
                        if i % 5 == 4:
                            raise RuntimeError("rolled back")
                    with lock:
                        committed.append(str(event.uuid))
                except RuntimeError:
                    pass
        finally:
            connection.close()

    def checkpointer() -> None:
        try:
            while not stop.is_set():
                checkpoint_take()
        finally:
            connection.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    sequencer = threading.Thread(target=checkpointer)
    sequencer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sequencer.join()
    checkpoint_take()
    positions = list(AuditLogLeaf.objects.order_by("position").values_list("position", "event__uuid"))
    assert [p for p, _ in positions] == list(range(len(positions)))
    logged = [str(u) for _, u in positions]
    assert sorted(logged) == sorted(committed) and len(committed) == 8 * 20
    assert not AuditPending.objects.exists()
    report = audit_verify()
    assert report.ok and report.checked == 160, report.problems


def test_processes_that_make_the_missing_key_at_once_all_use_the_one_that_was_written(audit_dirs: Path) -> None:
    # The first syncs of a fresh control plane cosign at once, each in its own worker.
    barrier = threading.Barrier(8)
    keys: list[str] = []
    errors: list[BaseException] = []

    def make() -> None:
        barrier.wait()
        try:
            keys.append(log_key(create=True).vkey)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(keys) == 8 and len(set(keys)) == 1
    assert keys[0] == log_key().vkey and not list(audit_dirs.glob(".audit_log_key.pem.*"))

"""The audit trail: appended with each change, append-only, numbered without a global lock, verifiable."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction

from audit.checkpoints import checkpoint_take
from audit.models import AppendOnlyError, AuditEvent, AuditLogLeaf, AuditPending
from audit.services import Actor, audit_record, audit_verify
from sites import services
from sites.models import Region, Site

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("audit_dirs")]


def test_it_numbers_events_in_order_and_queues_them_for_the_log(site_berlin: Site) -> None:
    with transaction.atomic():
        first = audit_record(actor=Actor.system("test"), action="test.one")
        second = audit_record(actor=Actor.system("test"), action="test.two")
    assert second.seq > first.seq
    assert first.prev_hash == "" and first.hash == first.compute_hash()
    assert set(AuditPending.objects.values_list("event_id", flat=True)) == set(AuditEvent.objects.values_list(
        "id", flat=True))
    checkpoint_take()
    assert not AuditPending.objects.exists()
    positions = list(AuditLogLeaf.objects.order_by("position").values_list("position", "event__seq"))
    assert [p for p, _ in positions] == list(range(AuditEvent.objects.count()))
    assert [s for _, s in positions] == sorted(AuditEvent.objects.values_list("seq", flat=True))
    report = audit_verify()
    assert report.ok and report.checked == len(positions), report.problems


def test_it_records_who_what_where_and_before_and_after(site_berlin: Site) -> None:
    services.site_update(actor=Actor("user", "alice", "10.1.2.3"), site=site_berlin, jurisdiction="EU")
    event = AuditEvent.objects.get(action="site.update")
    assert (event.actor_type, event.actor, event.source_ip) == ("user", "alice", "10.1.2.3")
    assert event.object_type == "sites.site" and event.object_id == str(site_berlin.uuid)
    assert event.site_uuid == site_berlin.uuid
    assert event.before["jurisdiction"] == "DE" and event.after["jurisdiction"] == "EU"


def test_it_writes_nothing_when_the_change_rolls_back(region_eu: Region) -> None:
    count = AuditEvent.objects.count()
    pending = AuditPending.objects.count()
    with pytest.raises(RuntimeError), transaction.atomic():
        services.site_create(actor=Actor.system("test"), region=region_eu, slug="doomed", name="Doomed")
        raise RuntimeError("the surrounding work failed")
    assert AuditEvent.objects.count() == count and AuditPending.objects.count() == pending
    assert not Site.objects.filter(slug="doomed").exists()
    checkpoint_take()
    assert audit_verify().ok


@pytest.mark.django_db(transaction=True)
def test_it_refuses_to_record_outside_a_transaction() -> None:
    with pytest.raises(RuntimeError, match="inside the transaction"):
        audit_record(actor=Actor.system(), action="nothing")


def test_it_refuses_updates_and_deletes_through_the_application(site_berlin: Site) -> None:
    event = AuditEvent.objects.first()
    assert event is not None
    event.action = "forged"
    with pytest.raises(AppendOnlyError):
        event.save()
    with pytest.raises(AppendOnlyError):
        event.delete()
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.filter(pk=event.pk).update(action="forged")
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.all().delete()


@pytest.mark.parametrize("table", ["audit_auditevent", "audit_auditlogleaf", "audit_auditcheckpoint"])
def test_it_refuses_updates_and_deletes_in_the_database_itself(site_berlin: Site, table: str) -> None:
    checkpoint_take()
    column = {"audit_auditevent": "action = 'forged'", "audit_auditlogleaf": "position = position + 1000",
              "audit_auditcheckpoint": "size = size + 1"}[table]
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET {column}")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {table}")


def test_it_reports_an_intact_log(tmp_path: Path) -> None:
    checkpoint_take()
    out = io.StringIO()
    call_command("audit_verify", stdout=out)
    assert "audit log intact" in out.getvalue() and "anchor files" in out.getvalue()

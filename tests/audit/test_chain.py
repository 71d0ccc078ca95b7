"""The audit chain: appended with each change, append-only, and verifiable."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction

from audit.models import AppendOnlyError, AuditChainHead, AuditEvent
from audit.services import Actor, audit_record, audit_verify
from sites import services
from sites.models import Region, Site

pytestmark = pytest.mark.django_db


def test_it_chains_every_event_to_the_one_before(site_berlin: Site) -> None:
    services.token_create(actor=Actor.system("test"), site=site_berlin)
    events = list(AuditEvent.objects.order_by("seq"))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].prev_hash == "0" * 64
    for before, after in zip(events, events[1:], strict=False):
        assert after.prev_hash == before.hash
    assert AuditChainHead.objects.get().hash == events[-1].hash
    assert audit_verify() == (len(events), None)


def test_it_records_who_what_where_and_before_and_after(site_berlin: Site) -> None:
    services.site_update(actor=Actor("user", "alice", "10.1.2.3"), site=site_berlin, jurisdiction="EU")
    event = AuditEvent.objects.get(action="site.update")
    assert (event.actor_type, event.actor, event.source_ip) == ("user", "alice", "10.1.2.3")
    assert event.object_type == "sites.site" and event.object_id == str(site_berlin.uuid)
    assert event.site_uuid == site_berlin.uuid
    assert event.before["jurisdiction"] == "DE" and event.after["jurisdiction"] == "EU"


def test_it_writes_nothing_when_the_change_rolls_back(region_eu: Region) -> None:
    count = AuditEvent.objects.count()
    with pytest.raises(RuntimeError), transaction.atomic():
        services.site_create(actor=Actor.system("test"), region=region_eu, slug="doomed", name="Doomed")
        raise RuntimeError("the surrounding work failed")
    assert AuditEvent.objects.count() == count
    assert not Site.objects.filter(slug="doomed").exists()
    assert audit_verify()[1] is None


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


def test_it_refuses_updates_in_the_database_itself(site_berlin: Site) -> None:
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE audit_auditevent SET action = 'forged'")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM audit_auditevent")


def _tamper(sql: str, *params: object) -> None:
    """Alter the table as an attacker with database access would: past the trigger."""
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE audit_auditevent DISABLE TRIGGER audit_event_append_only")
        cursor.execute(sql, params)
        cursor.execute("ALTER TABLE audit_auditevent ENABLE TRIGGER audit_event_append_only")


def test_it_names_the_first_altered_record(site_berlin: Site, site_ohio: Site) -> None:
    total = AuditEvent.objects.count()
    assert total >= 4
    _tamper("UPDATE audit_auditevent SET actor = 'mallory' WHERE seq = 3")
    checked, broken = audit_verify()
    assert broken is not None and broken.seq == 3 and "altered" in broken.reason
    assert checked == 2
    with pytest.raises(CommandError, match="broken at record #3"):
        call_command("audit_verify")


def test_it_names_a_removed_record(site_berlin: Site, site_ohio: Site) -> None:
    _tamper("DELETE FROM audit_auditevent WHERE seq = 2")
    broken = audit_verify()[1]
    assert broken is not None and broken.seq == 2 and "missing" in broken.reason


def test_it_notices_a_record_rehashed_to_hide_an_edit(site_berlin: Site, site_ohio: Site) -> None:
    # Recomputing one record's own hash after editing it does not help: the
    # next record's previous-hash no longer matches.
    event = AuditEvent.objects.get(seq=2)
    event.actor = "mallory"
    forged = event.compute_hash()
    _tamper("UPDATE audit_auditevent SET actor = 'mallory', hash = %s WHERE seq = 2", forged)
    broken = audit_verify()[1]
    assert broken is not None and broken.seq == 3 and "previous-hash" in broken.reason


def test_it_reports_an_intact_chain() -> None:
    out = io.StringIO()
    call_command("audit_verify", stdout=out)
    assert "audit chain intact" in out.getvalue()

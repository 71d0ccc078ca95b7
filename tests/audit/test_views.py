"""The audit trail in the console: scope, filters, pages and one event's before/after.

The permission matrix of these views is in tests/sites/test_views.py, with
every other console view.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from django.db import transaction
from django.test import Client
from django.utils import timezone

from audit.checkpoints import checkpoint_take
from audit.models import AuditEvent, AuditLogLeaf
from audit.services import Actor, audit_record
from sites import services
from sites.models import Site

pytestmark = pytest.mark.django_db

HTMX = {"HX-Request": "true"}


def seqs(response: Any) -> list[int]:
    assert response.status_code == 200, response.content[:500]
    return [int(s) for s in re.findall(r'hx-swap="innerHTML">(\d+)</a>', response.content.decode())]


def expected(**filters: Any) -> list[int]:
    return list(AuditEvent.objects.filter(**filters).order_by("-seq").values_list("seq", flat=True))


@pytest.fixture
def trail(site_berlin: Site, site_ohio: Site, operator: Any) -> None:
    token, _ = services.token_create(actor=Actor.user(operator, "192.0.2.7"), site=site_berlin, note="first")
    services.token_revoke(actor=Actor.user(operator, "192.0.2.7"), token=token)
    services.token_create(actor=Actor.system("test"), site=site_ohio)


def test_it_shows_each_person_only_the_events_of_their_sites(client: Client, operator: Any, trail: None,
                                                             site_berlin: Site, site_ohio: Site) -> None:
    client.force_login(operator)
    shown = seqs(client.get("/audit/"))
    assert shown == expected(site_uuid=site_berlin.uuid)
    assert not set(shown) & set(expected(site_uuid=site_ohio.uuid))


def test_it_shows_an_administrator_the_whole_chain(client: Client, admin_user: Any, trail: None) -> None:
    client.force_login(admin_user)
    assert seqs(client.get("/audit/")) == expected()


def test_it_shows_a_stranger_no_event(client: Client, stranger: Any, trail: None) -> None:
    client.force_login(stranger)
    response = client.get("/audit/")
    assert seqs(response) == [] and "No events." in response.content.decode()


def test_it_shows_seq_time_actor_action_object_ip_and_a_short_hash(client: Client, admin_user: Any,
                                                                   trail: None) -> None:
    client.force_login(admin_user)
    event = AuditEvent.objects.get(action="token.revoke")
    page = client.get("/audit/", {"action": "token.revoke"}).content.decode()
    for text in [f">{event.seq}</a>", event.created_at.strftime("%Y-%m-%d %H:%M:%S"), "operator", "token.revoke",
                 event.object_repr, "192.0.2.7", event.hash[:10]]:
        assert text in page, text


@pytest.mark.parametrize(
    ("params", "filters"),
    [
        ({"actor_type": "user"}, {"actor_type": "user"}),
        ({"actor_type": "system"}, {"actor_type": "system"}),
        ({"actor": "OPER"}, {"actor": "operator"}),
        ({"action": "token."}, {"action__startswith": "token."}),
        ({"action": "site.create"}, {"action": "site.create"}),
        ({"object": "plant berlin"}, {"object_repr__icontains": "plant berlin"}),
        ({"actor_type": "user", "action": "token.create"}, {"actor_type": "user", "action": "token.create"}),
    ],
    ids=["actor-type-user", "actor-type-system", "actor-text", "action-prefix", "action-exact", "object-text",
         "combined"],
)
def test_it_filters_events(client: Client, admin_user: Any, trail: None, params: dict[str, str],
                           filters: dict[str, Any]) -> None:
    client.force_login(admin_user)
    want = expected(**filters)
    assert want, "the filter should match something"
    assert seqs(client.get("/audit/", params)) == want


def test_it_filters_events_by_object_id(client: Client, admin_user: Any, trail: None) -> None:
    client.force_login(admin_user)
    event = AuditEvent.objects.get(action="token.revoke")
    assert seqs(client.get("/audit/", {"object": event.object_id})) == expected(object_id=event.object_id)


def test_it_filters_events_by_day(client: Client, admin_user: Any, trail: None) -> None:
    client.force_login(admin_user)
    today = timezone.now().date()
    day = dt.timedelta(days=1)
    assert seqs(client.get("/audit/", {"date_from": today, "date_to": today})) == expected()
    assert seqs(client.get("/audit/", {"date_from": today + day})) == []
    assert seqs(client.get("/audit/", {"date_to": today - day})) == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"date_from": "yesterday"}, "date_from: Enter a valid date."),
        ({"date_from": "2025-02-10", "date_to": "2025-02-01"}, "date_to: must be on or after the From date"),
        ({"actor_type": "robot"}, "actor_type: Select a valid choice."),
    ],
    ids=["bad-date", "reversed-range", "bad-actor-type"],
)
def test_it_refuses_a_bad_filter_naming_it(client: Client, admin_user: Any, trail: None, params: dict[str, str],
                                          message: str) -> None:
    client.force_login(admin_user)
    response = client.get("/audit/", params)
    assert response.status_code == 400
    page = response.content.decode()
    assert message in page
    assert re.findall(r'hx-swap="innerHTML">(\d+)</a>', page) == []


def test_it_pages_fifty_events_at_a_time_keeping_the_filters(client: Client, admin_user: Any, site_berlin: Site
                                                             ) -> None:
    with transaction.atomic():
        for i in range(120):
            audit_record(actor=Actor.system("test"), action="test.bulk", site_uuid=site_berlin.uuid,
                         object_repr=f"bulk {i}")
    client.force_login(admin_user)
    bulk = expected(action="test.bulk")
    first = client.get("/audit/", {"action": "test."})
    assert seqs(first) == bulk[:50]
    page = first.content.decode()
    assert "Page 1 of 3 · 120 events" in page
    assert 'href="/audit/?action=test.&amp;page=2"' in page and 'hx-get="/audit/?action=test.&amp;page=2"' in page
    assert seqs(client.get("/audit/", {"action": "test.", "page": "2"})) == bulk[50:100]
    assert seqs(client.get("/audit/", {"action": "test.", "page": "3"})) == bulk[100:]


def test_it_swaps_only_the_table_for_htmx(client: Client, admin_user: Any, trail: None) -> None:
    client.force_login(admin_user)
    response = client.get("/audit/", {"action": "token."}, headers=HTMX)
    page = response.content.decode()
    assert "<html" not in page and page.lstrip().startswith('<div id="audit-table">')
    assert seqs(response) == expected(action__startswith="token.")


def test_it_shows_an_events_before_and_after(client: Client, admin_user: Any, site_berlin: Site,
                                             audit_dirs: Any) -> None:
    services.site_update(actor=Actor.system("test"), site=site_berlin, jurisdiction="DE-BE")
    event = AuditEvent.objects.get(action="site.update")
    client.force_login(admin_user)
    page = client.get(f"/audit/{event.uuid}/").content.decode()
    assert '&quot;jurisdiction&quot;: &quot;DE&quot;' in page and '&quot;jurisdiction&quot;: &quot;DE-BE&quot;' in page
    assert event.hash in page and "waiting for the next checkpoint" in page and "<html" in page
    checkpoint_take()
    leaf = AuditLogLeaf.objects.get(event=event)
    page = client.get(f"/audit/{event.uuid}/").content.decode()
    assert f'<span class="mono">{leaf.position}</span>' in page and leaf.leaf_hex in page
    # The row expands in place: HTMX gets only the before/after.
    fragment = client.get(f"/audit/{event.uuid}/", headers=HTMX).content.decode()
    assert "<html" not in fragment and "Before" in fragment and "&quot;DE-BE&quot;" in fragment


def test_it_hides_an_event_outside_the_users_scope(client: Client, operator: Any, site_ohio: Site) -> None:
    event = AuditEvent.objects.get(action="site.create", site_uuid=site_ohio.uuid)
    client.force_login(operator)
    assert client.get(f"/audit/{event.uuid}/").status_code == 404

"""People in the console: users, estate-wide roles and grants, by role name, audited, refused with a reason."""

from __future__ import annotations

import html
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from audit.models import AuditEvent
from core.permissions import may_everywhere, user_can
from policies.permissions import grants_of
from sites.models import Region, Site
from tests.fixtures.personas import PASSWORD

pytestmark = pytest.mark.django_db

STRONG = "a-long-pass-phrase-42"


def client_for(user: Any) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_only_estate_admins_manage_people(admin_user: Any, operator: Any, viewer: Any) -> None:
    assert client_for(admin_user).get("/people/").status_code == 200
    for user in (operator, viewer):
        client = client_for(user)
        assert client.get("/people/").status_code == 403
        assert client.post("/people/new", {"username": "eve", "password": STRONG,
                                           "roles": ["Admin"]}).status_code == 403
    assert not get_user_model().objects.filter(username="eve").exists()
    assert "People</a>" in client_for(admin_user).get("/").content.decode()
    assert "People</a>" not in client_for(viewer).get("/").content.decode()


def test_an_admin_creates_a_person_and_grants_a_region_by_role_name(admin_user: Any, region_eu: Region,
                                                                    site_berlin: Site, site_ohio: Site) -> None:
    client = client_for(admin_user)
    response = client.post("/people/new", {"username": "grace", "email": "grace@example.org",
                                           "password": STRONG})
    grace = get_user_model().objects.get(username="grace")
    assert response.status_code == 302 and response.url == f"/people/{grace.pk}/"
    assert grace.check_password(STRONG) and not may_everywhere(grace, "view")
    created = AuditEvent.objects.get(action="user.create", object_repr="grace")
    assert created.actor == "admin" and created.after["roles"] == [] and STRONG not in str(created.after)

    assert client.post(f"/people/{grace.pk}/grants/add", {"role": "Operator", "scope": "region:eu"}).status_code == 302
    assert user_can(grace, "operate", site_berlin) and not user_can(grace, "view", site_ohio)
    page = client.get(f"/people/{grace.pk}/").content.decode()
    assert 'data-grant="Operator region:eu"' in page
    assert AuditEvent.objects.filter(action="role.grant", after__role="Operator").exists()

    # Operator and Approver on one region share "view": taking one away keeps the other whole.
    client.post(f"/people/{grace.pk}/grants/add", {"role": "Approver", "scope": "region:eu"})
    client.post(f"/people/{grace.pk}/grants/remove", {"role": "Operator", "scope": "region:eu"})
    assert [role for role, _ in grants_of(grace)] == ["Approver"]
    assert user_can(grace, "view", site_berlin) and user_can(grace, "approve", site_berlin)
    assert not user_can(grace, "operate", site_berlin)

    # Estate-wide roles and deactivation, audited with before and after.
    client.post(f"/people/{grace.pk}/update", {"roles": ["Viewer"], "email": "grace@example.org", "active": "on"})
    grace = get_user_model().objects.get(pk=grace.pk)  # permissions are cached on the object
    assert may_everywhere(grace, "view")
    client.post(f"/people/{grace.pk}/update", {"roles": ["Viewer"], "email": "grace@example.org"})
    grace.refresh_from_db()
    assert not grace.is_active
    change = AuditEvent.objects.filter(action="user.update", object_repr="grace").latest("seq")
    assert change.before == {"active": True} and change.after == {"active": False}
    assert not Client().login(username="grace", password=STRONG)


@pytest.mark.parametrize(("form", "message"), [
    ({"username": "bad name", "password": STRONG}, "username: 'bad name' may hold only letters"),
    ({"username": "admin", "password": STRONG}, "username: admin is taken"),
    ({"username": "ok", "password": "123"}, "password: This password is too short"),
    ({"username": "ok", "password": STRONG, "roles": ["Root"]}, "roles: unknown role 'Root'"),
])
def test_a_bad_new_person_is_refused_with_the_reason(admin_user: Any, form: dict[str, Any], message: str) -> None:
    before = get_user_model().objects.count()
    response = client_for(admin_user).post("/people/new", form)
    assert response.status_code == 422 and message in html.unescape(response.content.decode())
    assert get_user_model().objects.count() == before
    assert not AuditEvent.objects.filter(action="user.create").exists()


def test_an_admin_cannot_lock_themselves_out(admin_user: Any) -> None:
    admins = get_user_model().objects.create_user("boss", password=PASSWORD)
    client = client_for(admin_user)
    client.post("/people/new", {"username": "second", "password": STRONG, "roles": ["Admin"]})
    second = get_user_model().objects.get(username="second")
    own = Client()
    assert own.login(username="second", password=STRONG)
    refused = own.post(f"/people/{second.pk}/update", {"roles": ["Viewer"], "active": "on"})
    assert refused.status_code == 422 and "you cannot take your own Admin role away" in refused.content.decode()
    refused = own.post(f"/people/{second.pk}/update", {"roles": ["Admin"]})
    assert refused.status_code == 422 and "you cannot deactivate yourself" in refused.content.decode()
    second.refresh_from_db()
    assert second.is_active and may_everywhere(second, "administer")
    assert admins.is_active


def test_grant_mistakes_are_refused_with_the_reason(admin_user: Any, viewer: Any) -> None:
    client = client_for(admin_user)
    url = f"/people/{viewer.pk}/grants"
    cases = [
        (f"{url}/add", {"role": "Viewer", "scope": "region:eu"}, "already holds Viewer on region:eu"),
        (f"{url}/add", {"role": "Boss", "scope": "region:eu"}, "role: unknown role 'Boss'"),
        (f"{url}/add", {"role": "Viewer", "scope": "region:mars"}, "scope: no region or site 'region:mars'"),
        (f"{url}/remove", {"role": "Admin", "scope": "region:eu"}, "holds no Admin on region:eu"),
    ]
    for path, form, message in cases:
        response = client.post(path, form)
        assert response.status_code == 422 and message in html.unescape(response.content.decode()), message
    assert [r for r, _ in grants_of(viewer)] == ["Viewer"]


def test_a_password_reset_is_audited_without_the_password(admin_user: Any, viewer: Any) -> None:
    client = client_for(admin_user)
    assert client.post(f"/people/{viewer.pk}/update", {"password": STRONG}).status_code == 302
    viewer.refresh_from_db()
    assert viewer.check_password(STRONG)
    event = AuditEvent.objects.get(action="user.password_set", object_repr="viewer")
    assert STRONG not in f"{event.before}{event.after}"
    short = client.post(f"/people/{viewer.pk}/update", {"password": "abc"})
    assert short.status_code == 422 and "too short" in short.content.decode()

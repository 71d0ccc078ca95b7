"""Console logins: audited, failed ones too, and throttled after repeated failures."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.test import Client

from audit.models import AuditEvent
from policies.models import LoginFailure
from tests.fixtures.personas import PASSWORD, make_user

pytestmark = pytest.mark.django_db


def attempt(client: Client, username: str, password: str, ip: str = "10.0.0.7") -> Any:
    return client.post("/login/", {"username": username, "password": password}, REMOTE_ADDR=ip)


def test_logins_logouts_and_failures_are_audited(settings: Any) -> None:
    make_user("ada")
    client = Client()
    assert attempt(client, "ada", "wrong").status_code == 200
    failed = AuditEvent.objects.get(action="auth.login_failed")
    assert failed.object_repr == "ada" and failed.source_ip == "10.0.0.7" and "wrong" not in str(failed.after)
    response = attempt(client, "ada", PASSWORD)
    assert response.status_code == 302
    login = AuditEvent.objects.get(action="auth.login")
    assert (login.actor, login.source_ip) == ("ada", "10.0.0.7")
    client.post("/logout/", REMOTE_ADDR="10.0.0.7")
    assert AuditEvent.objects.filter(action="auth.logout", actor="ada").count() == 1


def test_repeated_failures_throttle_the_username_even_with_the_right_password(settings: Any) -> None:
    settings.LOGIN_MAX_FAILURES = 3
    make_user("ada")
    client = Client()
    for _ in range(3):
        page = attempt(client, "ada", "guess").content.decode()
        assert "Please enter a correct username and password" in page
    page = attempt(client, "ada", PASSWORD, ip="10.9.9.9").content.decode()
    assert "Too many failed logins for this username or from your address: try again in 15 minute(s)." in page
    assert "_auth_user_id" not in client.session
    throttled = AuditEvent.objects.get(action="auth.login_throttled")
    assert throttled.after["username"] == "ada" and throttled.after["wait_s"] > 800
    # The throttled attempt was not even checked: it is no failure of its own.
    assert LoginFailure.objects.count() == 3
    # Once the failures leave the window, the right password works again.
    LoginFailure.objects.update(at=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    assert attempt(client, "ada", PASSWORD).status_code == 302


def test_repeated_failures_from_one_address_throttle_it_for_every_username(settings: Any) -> None:
    settings.LOGIN_MAX_FAILURES = 3
    make_user("bob")
    client = Client()
    for name in ("root", "admin", "alice"):
        attempt(client, name, "guess", ip="192.0.2.1")
    assert "Too many failed logins" in attempt(client, "bob", PASSWORD, ip="192.0.2.1").content.decode()
    # bob from elsewhere is not held back by someone else's guessing.
    assert attempt(client, "bob", PASSWORD, ip="192.0.2.2").status_code == 302


def test_the_admin_login_is_throttled_too(settings: Any) -> None:
    settings.LOGIN_MAX_FAILURES = 2
    make_user("root", superuser=True)
    client = Client()
    for _ in range(2):
        client.post("/admin/login/", {"username": "root", "password": "x"}, REMOTE_ADDR="10.1.1.1")
    page = client.post("/admin/login/", {"username": "root", "password": PASSWORD}, REMOTE_ADDR="10.1.1.1")
    assert page.status_code == 200 and "Too many failed logins" in page.content.decode()
    assert AuditEvent.objects.filter(action="auth.login_failed", object_repr="root").count() == 2

"""Console logins: every login, logout and failed login audited, failed logins throttled.

A username, or a client address, with ``LOGIN_MAX_FAILURES`` failed logins
within ``LOGIN_WINDOW_S`` seconds must wait until the oldest of them leaves
the window. The login form then refuses before checking the password (so a
guess made while throttled proves nothing), says how long to wait, and the
refusal is audited (``auth.login_throttled``). Failures are counted in the
database, so every control-plane process sees the same ones; a success does
not wipe them, as a guesser who owns one account must not reset another's.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import signals
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import LoginView
from django.db import transaction
from django.db.models import Q
from django.http import HttpRequest
from django.utils import timezone

from audit.models import ActorType
from audit.services import Actor, audit_record, client_ip
from policies.models import LoginFailure


def _anonymous(username: str, ip: str | None) -> Actor:
    """Who tried: a name typed at the login form is a claim, recorded as such."""
    return Actor(ActorType.SYSTEM, f"login:{username[:100]}", ip)


def throttle_wait_s(username: str, ip: str | None, *, now: dt.datetime | None = None) -> float:
    """Seconds ``username`` (or anyone from ``ip``) must wait before trying again; 0 when they may try now."""
    now = now or timezone.now()
    window = dt.timedelta(seconds=settings.LOGIN_WINDOW_S)
    recent = LoginFailure.objects.filter(at__gt=now - window)
    wait = 0.0
    for who in (Q(username=username), Q(ip=ip) if ip else None):
        if who is None:
            continue
        times = list(recent.filter(who).order_by("-at").values_list("at", flat=True)[:settings.LOGIN_MAX_FAILURES])
        if len(times) >= settings.LOGIN_MAX_FAILURES:
            wait = max(wait, (times[-1] + window - now).total_seconds())
    return max(wait, 0.0)


THROTTLED = ("Too many failed logins for this username or from your address: try again in %(minutes)s "
             "minute(s).")


class ThrottledAuthenticationForm(AuthenticationForm):
    """The console's login form: refuses a throttled username or address before checking the password."""

    def clean(self) -> dict[str, Any]:
        username = str(self.cleaned_data.get("username") or "")
        ip = client_ip(self.request) if self.request is not None else None
        wait = throttle_wait_s(username, ip)
        if wait > 0:
            with transaction.atomic():
                audit_record(actor=_anonymous(username, ip), action="auth.login_throttled",
                             object_repr=username[:150], after={"username": username[:150], "wait_s": round(wait)})
            raise forms.ValidationError(THROTTLED, code="throttled",
                                        params={"minutes": max(1, math.ceil(wait / 60))})
        return super().clean()


class ThrottledAdminAuthenticationForm(ThrottledAuthenticationForm, AdminAuthenticationForm):
    """The same for the Django admin's login page."""


class ConsoleLoginView(LoginView):
    template_name = "registration/login.html"
    authentication_form = ThrottledAuthenticationForm


def _on_login(sender: Any, request: HttpRequest, user: Any, **kwargs: Any) -> None:
    with transaction.atomic():
        audit_record(actor=Actor.user(user, client_ip(request)), action="auth.login", obj=user,
                     object_repr=user.get_username())


def _on_logout(sender: Any, request: HttpRequest, user: Any, **kwargs: Any) -> None:
    if user is None:
        return
    with transaction.atomic():
        audit_record(actor=Actor.user(user, client_ip(request)), action="auth.logout", obj=user,
                     object_repr=user.get_username())


def _on_failure(sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **kwargs: Any) -> None:
    """Record a failed login (never the password: Django has masked it) and prune failures past the window."""
    username = str(credentials.get("username") or "")[:150]
    ip = client_ip(request) if request is not None else None
    now = timezone.now()
    with transaction.atomic():
        LoginFailure.objects.filter(at__lte=now - dt.timedelta(seconds=settings.LOGIN_WINDOW_S)).delete()
        LoginFailure.objects.create(username=username, ip=ip, at=now)
        audit_record(actor=_anonymous(username, ip), action="auth.login_failed", object_repr=username,
                     after={"username": username})


def connect() -> None:
    """Hook the audit into Django's login signals (from ``PoliciesConfig.ready``)."""
    signals.user_logged_in.connect(_on_login, dispatch_uid="policies-audit-login")
    signals.user_logged_out.connect(_on_logout, dispatch_uid="policies-audit-logout")
    signals.user_login_failed.connect(_on_failure, dispatch_uid="policies-audit-login-failed")

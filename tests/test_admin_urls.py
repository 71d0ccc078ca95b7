"""Every registered admin answers 404, never 500, to an object id that names nothing."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.test import Client
from guardian.admin import GuardedModelAdmin

pytestmark = pytest.mark.django_db

BAD_IDS = ["abc", "1'", "3f2c8a1e-9b7d-4c55-a0e1-6d2f4b8c9e10", "99999999999999999999", "0"]
PAGES = ["change", "delete", "history"]
GUARDED_PAGES = ["permissions", "permissions/user-manage/{user}", "permissions/group-manage/{group}"]


def _pages(model_admin: Any) -> list[str]:
    return [*PAGES, *(GUARDED_PAGES if isinstance(model_admin, GuardedModelAdmin) else [])]


REGISTERED = sorted(admin.site._registry.items(), key=lambda item: item[0]._meta.label)


@pytest.fixture
def superuser_client(client: Client, admin_user: Any) -> Client:
    client.force_login(admin_user)
    return client


def test_it_walks_every_registered_admin() -> None:
    labels = {model._meta.label for model, _ in REGISTERED}
    assert {"sites.Site", "sites.Region", "sites.Node", "auth.User", "audit.AuditEvent"} <= labels
    assert any(isinstance(model_admin, GuardedModelAdmin) for _, model_admin in REGISTERED)


@pytest.mark.parametrize(("model", "model_admin"), REGISTERED, ids=[m._meta.label for m, _ in REGISTERED])
def test_it_answers_404_to_an_id_that_names_nothing(
    superuser_client: Client, admin_user: Any, model: Any, model_admin: Any
) -> None:
    base = f"/admin/{model._meta.app_label}/{model._meta.model_name}"
    answers = {}
    for page in _pages(model_admin):
        for bad_id in BAD_IDS:
            path = f"{base}/{bad_id}/{page.format(user=admin_user.pk, group=1)}/"
            answers[path] = superuser_client.get(path).status_code
    assert {path: status for path, status in answers.items() if status != 404} == {}


@pytest.mark.parametrize("kind", ["user", "group"])
@pytest.mark.parametrize("bad_id", BAD_IDS[:2])
def test_it_answers_404_to_a_principal_id_that_names_nothing(
    superuser_client: Client, site_berlin: Any, kind: str, bad_id: str
) -> None:
    path = f"/admin/sites/site/{site_berlin.pk}/permissions/{kind}-manage/{bad_id}/"
    assert superuser_client.get(path).status_code == 404

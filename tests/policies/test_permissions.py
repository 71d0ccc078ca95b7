"""Roles and scopes: who sees which sites, and what a grant covers."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Group

from audit.models import AuditEvent
from audit.services import Actor
from core.permissions import RestrictedQuerySet, user_can
from policies.permissions import ROLES, role_grant, role_revoke
from sites.models import Node, Region, Site
from tests.fixtures.personas import make_site, make_user

pytestmark = pytest.mark.django_db


def slugs(user: Any, action: str = "view") -> set[str]:
    return set(Site.objects.all().restrict(user, action).values_list("slug", flat=True))  # type: ignore[arg-type]


def test_it_creates_the_four_role_groups() -> None:
    assert set(Group.objects.values_list("name", flat=True)) >= set(ROLES)


def test_it_lets_a_region_grant_cover_its_sites_including_later_ones(
    viewer: Any, site_berlin: Site, site_ohio: Site, region_eu: Region
) -> None:
    assert slugs(viewer) == {"plant-berlin"}
    make_site(region_eu, "plant-lyon")
    assert slugs(viewer) == {"plant-berlin", "plant-lyon"}
    assert set(Region.objects.all().restrict(viewer).values_list("slug", flat=True)) == {"eu"}


def test_it_limits_a_site_grant_to_that_site(region_eu: Region, site_berlin: Site) -> None:
    lyon = make_site(region_eu, "plant-lyon")
    user = make_user("lyon-operator")
    role_grant(actor=Actor.system("test"), principal=user, role="Operator", obj=lyon)
    assert slugs(user) == {"plant-lyon"}
    assert slugs(user, "operate") == {"plant-lyon"}
    assert user_can(user, "operate", lyon) and not user_can(user, "operate", site_berlin)


def test_it_gives_a_viewer_no_operate_rights(viewer: Any, site_berlin: Site) -> None:
    assert slugs(viewer, "operate") == set()
    assert not user_can(viewer, "operate", site_berlin)


def test_it_shows_a_stranger_nothing(stranger: Any, site_berlin: Site, site_ohio: Site) -> None:
    assert slugs(stranger) == set()
    assert not Node.objects.all().restrict(stranger).exists()
    assert not AuditEvent.objects.all().restrict(stranger).exists()


def test_it_gives_estate_wide_roles_through_group_membership(site_berlin: Site, site_ohio: Site) -> None:
    user = make_user("global-viewer", groups=("Viewer",))
    assert slugs(user) == {"plant-berlin", "plant-ohio"}
    assert slugs(user, "operate") == set()
    admin = make_user("global-admin", groups=("Admin",))
    assert slugs(admin, "administer") == {"plant-berlin", "plant-ohio"}


def test_it_scopes_the_audit_trail_to_visible_sites(viewer: Any, site_berlin: Site, site_ohio: Site) -> None:
    visible = set(AuditEvent.objects.all().restrict(viewer).values_list("site_uuid", flat=True))
    assert visible == {site_berlin.uuid}


def test_it_audits_grants_and_revokes(region_eu: Region, site_berlin: Site) -> None:
    user = make_user("temp")
    role_grant(actor=Actor.system("test"), principal=user, role="Viewer", obj=region_eu)
    assert slugs(user) == {"plant-berlin"}
    role_revoke(actor=Actor.system("test"), principal=user, role="Viewer", obj=region_eu)
    assert slugs(user) == set()
    actions = list(
        AuditEvent.objects.filter(action__startswith="role.").order_by("seq").values_list("action", flat=True)
    )
    assert actions[-2:] == ["role.grant", "role.revoke"]


def test_it_refuses_an_unknown_role(region_eu: Region) -> None:
    with pytest.raises(ValueError, match="unknown role 'Owner'"):
        role_grant(actor=Actor.system("test"), principal=make_user("x"), role="Owner", obj=region_eu)


def test_it_refuses_to_restrict_a_model_it_does_not_know(viewer: Any) -> None:
    with pytest.raises(TypeError, match="auth.Group declares no scope"):
        RestrictedQuerySet(model=Group).restrict(viewer)


# The apps of this project: every one of their models declares how it is scoped.
PROJECT_APPS = {"audit", "models_registry", "orchestrator", "policies", "queries", "rollouts", "sites"}


def test_it_knows_the_scope_of_every_model_of_the_project(
    viewer: Any, stranger: Any, admin_user: Any, site_berlin: Site, site_ohio: Site
) -> None:
    from django.apps import apps

    from core.permissions import Scope

    models = [m for m in apps.get_models() if m._meta.app_label in PROJECT_APPS]
    assert len(models) > 20
    for model in models:
        label = model._meta.label
        assert isinstance(getattr(model, "scope", None), Scope), f"{label} declares no scope"
        every = model.objects.all()  # type: ignore[attr-defined]
        # The declared paths are real lookups: each query runs, for each persona.
        assert not every.restrict(stranger).exists(), label
        assert every.restrict(admin_user).count() == every.count(), label
        list(every.restrict(viewer, "operate")[:1])


def test_it_narrows_objects_that_hang_off_a_site_through_their_declared_path(
    viewer: Any, site_berlin: Site, site_ohio: Site
) -> None:
    from edge_runtime import protocol
    from orchestrator.models import DesiredState
    from sites import services

    for site, name in ((site_berlin, "b1"), (site_ohio, "o1")):
        _, token = services.token_create(actor=Actor.system("test"), site=site)
        # Enrollment publishes the node's first desired state.
        services.node_enroll(request=protocol.EnrollRequest(token=token, name=name), ip="127.0.0.1")
    assert DesiredState.objects.count() == 2
    seen = DesiredState.objects.restrict(viewer).values_list("node__name", flat=True)
    assert list(seen) == ["b1"]

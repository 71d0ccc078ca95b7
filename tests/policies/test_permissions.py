"""Roles and scopes: who sees which sites, and what a grant covers."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Group

from audit.models import AuditEvent
from audit.services import Actor
from policies.permissions import ROLES, restrict, role_grant, role_revoke, user_can
from sites.models import Node, Region, Site
from tests.fixtures.personas import make_site, make_user

pytestmark = pytest.mark.django_db


def slugs(user: Any, action: str = "view") -> set[str]:
    return set(restrict(Site.objects.all(), user, action).values_list("slug", flat=True))  # type: ignore[arg-type]


def test_it_creates_the_four_role_groups() -> None:
    assert set(Group.objects.values_list("name", flat=True)) >= set(ROLES)


def test_it_lets_a_region_grant_cover_its_sites_including_later_ones(
    viewer: Any, site_berlin: Site, site_ohio: Site, region_eu: Region
) -> None:
    assert slugs(viewer) == {"plant-berlin"}
    make_site(region_eu, "plant-lyon")
    assert slugs(viewer) == {"plant-berlin", "plant-lyon"}
    assert set(restrict(Region.objects.all(), viewer).values_list("slug", flat=True)) == {"eu"}


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
    assert not restrict(Node.objects.all(), stranger).exists()
    assert not restrict(AuditEvent.objects.all(), stranger).exists()


def test_it_gives_estate_wide_roles_through_group_membership(site_berlin: Site, site_ohio: Site) -> None:
    user = make_user("global-viewer", groups=("Viewer",))
    assert slugs(user) == {"plant-berlin", "plant-ohio"}
    assert slugs(user, "operate") == set()
    admin = make_user("global-admin", groups=("Admin",))
    assert slugs(admin, "administer") == {"plant-berlin", "plant-ohio"}


def test_it_scopes_the_audit_trail_to_visible_sites(viewer: Any, site_berlin: Site, site_ohio: Site) -> None:
    visible = set(restrict(AuditEvent.objects.all(), viewer).values_list("site_uuid", flat=True))
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
    with pytest.raises(TypeError, match="does not know"):
        restrict(Group.objects.all(), viewer)

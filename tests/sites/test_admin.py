"""The Django admin changes regions, sites, nodes and tokens through the same services as the console."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

from audit.models import AuditEvent
from edge_runtime import protocol, signing
from orchestrator.models import DesiredState
from sites import services
from sites.models import Clearance, EnrollmentToken, Node, NodeStatus, Region, Site
from tests.fixtures.personas import PASSWORD
from tests.sites.test_agent_api import enroll, new_token, sync

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_(admin_user: Any) -> Client:
    client = Client()
    assert client.login(username=admin_user.username, password=PASSWORD)
    return client


@pytest.fixture
def agent() -> Client:
    return Client()


def _enrolled(agent: Client, site: Site, name: str) -> dict[str, Any]:
    body = enroll(agent, new_token(site), name=name)
    assert body.status_code == 201, body.content
    return dict(body.json())


def _site_form(site: Site, **changes: Any) -> dict[str, Any]:
    form = {"region": site.region.pk, "slug": site.slug, "name": site.name, "jurisdiction": site.jurisdiction,
            "clearance": site.clearance, "connectivity": site.connectivity,
            "expired_bundles": site.expired_bundles, "latitude": site.latitude,
            "longitude": site.longitude, "labels": json.dumps(site.labels), "_save": "Save"}
    form.update(changes)
    return form


def _signed_state(agent: Client, node: dict[str, Any], applied: int) -> protocol.DesiredState:
    answer = protocol.SyncResponse.model_validate(
        sync(agent, node["node_id"], node["credential"], {"actual": {"applied_generation": applied}}).json())
    assert answer.desired is not None, "no new desired state was sent"
    return signing.verify_desired_state(answer.desired, signing.public_key_from_b64(node["signing_public_key"]))


def test_it_republishes_the_nodes_signed_policy_when_the_admin_changes_a_sites_clearance(
    admin_client_: Client, agent: Client, site_berlin: Site, site_ohio: Site
) -> None:
    node = _enrolled(agent, site_berlin, "gw-1")
    other = _enrolled(agent, site_ohio, "gw-2")
    first = _signed_state(agent, node, 0)
    assert first.policy["site"]["clearance"] == Clearance.INTERNAL

    response = admin_client_.post(f"/admin/sites/site/{site_berlin.pk}/change/",
                                  _site_form(site_berlin, clearance=Clearance.SECRET, jurisdiction="EU"))
    assert response.status_code == 302, response.content.decode()[:3000]

    state = _signed_state(agent, node, first.generation)
    assert state.generation == first.generation + 1
    assert state.policy["site"]["clearance"] == Clearance.SECRET
    assert state.policy["site"]["jurisdiction"] == "EU"
    (event,) = AuditEvent.objects.filter(action="site.update", object_id=str(site_berlin.uuid))
    assert event.before["clearance"] == Clearance.INTERNAL and event.after["clearance"] == Clearance.SECRET
    assert event.actor == "admin"
    # Another site's nodes are not touched.
    assert DesiredState.objects.get(node__uuid=other["node_id"]).generation == 1


def test_it_sets_an_air_gapped_sites_policy_on_expired_bundles_through_the_service(admin_client_: Client,
                                                                                     site_berlin: Site) -> None:
    form = _site_form(site_berlin, connectivity="air_gapped", expired_bundles="warn")
    response = admin_client_.post(f"/admin/sites/site/{site_berlin.pk}/change/", form)
    assert response.status_code == 302, response.content.decode()[:3000]
    site_berlin.refresh_from_db()
    assert (site_berlin.connectivity, site_berlin.expired_bundles) == ("air_gapped", "warn")
    (event,) = AuditEvent.objects.filter(action="site.update", object_id=str(site_berlin.uuid))
    assert (event.before["expired_bundles"], event.after["expired_bundles"]) == ("refuse", "warn")


def test_it_writes_nothing_when_the_admin_saves_a_site_unchanged(admin_client_: Client, site_berlin: Site) -> None:
    response = admin_client_.post(f"/admin/sites/site/{site_berlin.pk}/change/", _site_form(site_berlin))
    assert response.status_code == 302
    assert not AuditEvent.objects.filter(action="site.update").exists()


def test_it_creates_a_site_and_a_region_through_their_services(admin_client_: Client, region_eu: Region) -> None:
    response = admin_client_.post("/admin/sites/region/add/", {"slug": "apac", "name": "Asia", "description": ""})
    assert response.status_code == 302
    region = Region.objects.get(slug="apac")
    assert AuditEvent.objects.filter(action="region.create", object_id=str(region.uuid)).count() == 1
    site = Site(region=region, slug="store-7", name="Store 7", latitude=1.0, longitude=2.0, labels={"a": "b"})
    response = admin_client_.post("/admin/sites/site/add/", _site_form(site))
    assert response.status_code == 302, response.content.decode()[:3000]
    created = Site.objects.get(slug="store-7")
    assert created.labels == {"a": "b"} and created.region == region
    assert AuditEvent.objects.filter(action="site.create", object_id=str(created.uuid)).count() == 1


def test_it_republishes_the_nodes_of_a_region_the_admin_renames(
    admin_client_: Client, agent: Client, site_berlin: Site
) -> None:
    node = _enrolled(agent, site_berlin, "gw-1")
    first = _signed_state(agent, node, 0)
    region = site_berlin.region
    response = admin_client_.post(f"/admin/sites/region/{region.pk}/change/",
                                  {"slug": "europe", "name": region.name, "description": ""})
    assert response.status_code == 302
    state = _signed_state(agent, node, first.generation)
    assert state.policy["site"]["region"] == "europe"
    assert AuditEvent.objects.filter(action="region.update", object_id=str(region.uuid)).count() == 1


def test_it_revokes_a_node_in_the_admin_as_node_revoke_does(
    admin_client_: Client, agent: Client, site_berlin: Site
) -> None:
    node = _enrolled(agent, site_berlin, "gw-1")
    assert sync(agent, node["node_id"], node["credential"]).status_code == 200
    row = Node.objects.get(uuid=node["node_id"])
    response = admin_client_.post("/admin/sites/node/", {"action": "revoke", "_selected_action": [row.pk]})
    assert response.status_code == 302
    row.refresh_from_db()
    assert row.revoked_at is not None and row.status == NodeStatus.REVOKED
    assert AuditEvent.objects.filter(action="node.revoke", object_id=node["node_id"], actor="admin").count() == 1
    refused = sync(agent, node["node_id"], node["credential"])
    assert refused.status_code == 403 and "revoked" in refused.json()["error"]


def test_it_offers_no_way_to_edit_or_delete_a_node_around_its_services(
    admin_client_: Client, agent: Client, site_berlin: Site
) -> None:
    node = _enrolled(agent, site_berlin, "gw-1")
    row = Node.objects.get(uuid=node["node_id"])
    page = admin_client_.get(f"/admin/sites/node/{row.pk}/change/")
    assert page.status_code == 200 and 'name="role"' not in page.content.decode()
    posted = admin_client_.post(f"/admin/sites/node/{row.pk}/change/", {"name": "x", "role": "server",
                                                                        "site": site_berlin.pk})
    assert posted.status_code == 403
    assert admin_client_.post(f"/admin/sites/node/{row.pk}/delete/", {"post": "yes"}).status_code == 403
    row.refresh_from_db()
    assert (row.name, row.role) == ("gw-1", "gateway")


def test_it_refuses_deletions_that_would_orphan_things(
    admin_client_: Client, agent: Client, site_berlin: Site
) -> None:
    _enrolled(agent, site_berlin, "gw-1")
    assert admin_client_.post(f"/admin/sites/site/{site_berlin.pk}/delete/", {"post": "yes"}).status_code == 403
    region = site_berlin.region
    admin_client_.post(f"/admin/sites/region/{region.pk}/delete/", {"post": "yes"})
    assert Site.objects.filter(pk=site_berlin.pk).exists() and Region.objects.filter(pk=region.pk).exists()
    assert not AuditEvent.objects.filter(action__endswith=".delete").exists()
    token = EnrollmentToken.objects.filter(site=site_berlin).first()
    assert token is not None
    assert admin_client_.post(f"/admin/sites/enrollmenttoken/{token.pk}/delete/", {"post": "yes"}).status_code == 403
    state = DesiredState.objects.get()
    delete = f"/admin/orchestrator/desiredstate/{state.pk}/delete/"
    assert admin_client_.post(delete, {"post": "yes"}).status_code == 403


def test_it_deletes_an_empty_region_with_an_audit_event(admin_client_: Client, region_us: Region) -> None:
    response = admin_client_.post(f"/admin/sites/region/{region_us.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Region.objects.filter(pk=region_us.pk).exists()
    assert AuditEvent.objects.filter(action="region.delete", object_id=str(region_us.uuid)).count() == 1


def test_it_creates_and_revokes_tokens_through_their_services(admin_client_: Client, site_berlin: Site) -> None:
    expires = (timezone.now() + dt.timedelta(hours=2)).strftime("%Y-%m-%d %H:%M:%S")
    response = admin_client_.post("/admin/sites/enrollmenttoken/add/", {
        "site": site_berlin.pk, "note": "line 3", "max_uses": "2", "expires_at_0": expires.split()[0],
        "expires_at_1": expires.split()[1]}, follow=True)
    assert response.status_code == 200
    token = EnrollmentToken.objects.get(site=site_berlin)
    shown = [str(m) for m in response.context["messages"]]
    value = next(m.split(": ", 1)[1].split(" ", 1)[0] for m in shown if "enrollment token for" in m)
    assert services.token_check(site=site_berlin, value=value) == token
    # Shown once in the page, never carried in a cookie (messages live in the server-side session).
    cookies = [v.OutputString() for v in admin_client_.cookies.values()]
    assert cookies and not any(value in c for c in cookies)
    assert token.max_uses == 2 and token.note == "line 3"
    assert AuditEvent.objects.filter(action="token.create", object_id=str(token.uuid), actor="admin").count() == 1

    response = admin_client_.post("/admin/sites/enrollmenttoken/", {"action": "revoke",
                                                                    "_selected_action": [token.pk]})
    assert response.status_code == 302
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert AuditEvent.objects.filter(action="token.revoke", object_id=str(token.uuid)).count() == 1
    with pytest.raises(services.TokenRefused):
        services.token_check(site=site_berlin, value=value)


def test_it_refuses_a_token_whose_terms_the_service_would_refuse(admin_client_: Client, site_berlin: Site) -> None:
    expires = timezone.now() + dt.timedelta(days=90)
    response = admin_client_.post("/admin/sites/enrollmenttoken/add/", {
        "site": site_berlin.pk, "max_uses": "1", "expires_at_0": f"{expires:%Y-%m-%d}",
        "expires_at_1": f"{expires:%H:%M:%S}"})
    assert response.status_code == 200
    assert "between 1 minute and 30 days" in response.content.decode()
    assert not EnrollmentToken.objects.exists()


def test_it_shows_object_permissions_but_grants_them_only_as_audited_roles(
    admin_client_: Client, admin_user: Any, site_berlin: Site
) -> None:
    assert admin_client_.get(f"/admin/sites/site/{site_berlin.pk}/permissions/").status_code == 200
    url = f"/admin/sites/site/{site_berlin.pk}/permissions/user-manage/{admin_user.pk}/"
    assert admin_client_.get(url).status_code == 200
    assert admin_client_.post(url, {"permissions": ["operate_site"]}).status_code == 403
    group = Group.objects.create(name="line-techs")
    url = f"/admin/sites/site/{site_berlin.pk}/permissions/group-manage/{group.pk}/"
    assert admin_client_.post(url, {"permissions": ["operate_site"]}).status_code == 403
    from guardian.models import GroupObjectPermission, UserObjectPermission

    assert not UserObjectPermission.objects.exists() and not GroupObjectPermission.objects.exists()


def test_it_audits_a_role_given_to_a_user_in_the_admin(admin_client_: Client, viewer: Any) -> None:
    operators = Group.objects.get(name="Operator")
    page = admin_client_.get(f"/admin/auth/user/{viewer.pk}/change/")
    assert page.status_code == 200
    form = {"username": viewer.username, "is_active": "on", "groups": [operators.pk],
            "date_joined_0": f"{viewer.date_joined:%Y-%m-%d}", "date_joined_1": f"{viewer.date_joined:%H:%M:%S}",
            "_save": "Save"}
    response = admin_client_.post(f"/admin/auth/user/{viewer.pk}/change/", form)
    assert response.status_code == 302, response.content.decode()[:3000]
    (event,) = AuditEvent.objects.filter(action="user.update", actor="admin")
    assert "Operator" not in event.before["groups"] and "Operator" in event.after["groups"]


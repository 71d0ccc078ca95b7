"""The operator console's site and node pages: permissions, filters, tokens, installers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol
from orchestrator import keys
from sites import services
from sites.installer import render_installer
from sites.models import EnrollmentToken, Node, Site
from sites.selectors import site_list
from sites.sync import node_sync
from tests.fixtures.personas import make_site

pytestmark = pytest.mark.django_db

PERSONAS = ["admin_user", "viewer", "operator", "approver", "stranger", "anonymous"]
HTMX = {"HX-Request": "true"}
MAP_DATA_URL = "/map/sites.json"


def enroll(site: Site, name: str, *, synced: bool = True, role: str = "gateway") -> Node:
    _, value = services.token_create(actor=Actor.system("test"), site=site)
    hardware = protocol.Hardware(cpu_model="Xeon", cpu_cores=8, memory_mb=16384, os="Linux", arch="x86_64",
                                 execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    node, _ = services.node_enroll(
        request=protocol.EnrollRequest(token=value, name=name, role=role, runtime_version="0.1.0", hardware=hardware),
        ip="10.0.0.5",
    )
    if synced:
        node_sync(node=node, request=protocol.SyncRequest(actual=protocol.ActualState(applied_generation=1)),
                           ip="10.0.0.6")
    return Node.objects.get(pk=node.pk)


def seen_ago(node: Node, seconds: float) -> None:
    Node.objects.filter(pk=node.pk).update(last_seen_at=timezone.now() - dt.timedelta(seconds=seconds))


@dataclasses.dataclass
class World:
    berlin: Site
    ohio: Site
    node_berlin: Node
    node_ohio: Node
    token_berlin: EnrollmentToken
    token_berlin_value: str
    token_ohio: EnrollmentToken
    token_ohio_value: str


@pytest.fixture
def world(site_berlin: Site, site_ohio: Site) -> World:
    token_b, value_b = services.token_create(actor=Actor.system("test"), site=site_berlin, max_uses=5)
    token_o, value_o = services.token_create(actor=Actor.system("test"), site=site_ohio, max_uses=5)
    return World(site_berlin, site_ohio, enroll(site_berlin, "gw-berlin"), enroll(site_ohio, "gw-ohio"),
                 token_b, value_b, token_o, value_o)


def as_persona(client: Client, request: pytest.FixtureRequest, persona: str) -> Client:
    if persona != "anonymous":
        client.force_login(request.getfixturevalue(persona))
    return client


# -- the permission matrix -------------------------------------------------------

# status per persona, in the order of PERSONAS
SEE_ALL = (200, 200, 200, 200, 200, 302)
SEE_EU = (200, 200, 200, 200, 404, 302)
SEE_US = (200, 404, 404, 404, 404, 302)
OPERATE_EU = (200, 403, 200, 403, 404, 302)
OPERATE_US = (200, 404, 404, 404, 404, 302)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    method: str
    url: Callable[[World], str]
    statuses: tuple[int, ...]
    data: Callable[[World], dict[str, Any]] = lambda w: {}
    # What the request changes when it is allowed; must not change when refused.
    effect: Callable[[World], Any] = lambda w: None


def _token_count(w: World) -> int:
    return EnrollmentToken.objects.count()


CASES = [
    Case("fleet", "get", lambda w: "/", SEE_ALL),
    Case("site-eu", "get", lambda w: f"/sites/{w.berlin.slug}/", SEE_EU),
    Case("site-us", "get", lambda w: f"/sites/{w.ohio.slug}/", SEE_US),
    Case("node-eu", "get", lambda w: f"/nodes/{w.node_berlin.uuid}/", SEE_EU),
    Case("node-us", "get", lambda w: f"/nodes/{w.node_ohio.uuid}/", SEE_US),
    Case("audit-list", "get", lambda w: "/audit/", SEE_ALL),
    Case("audit-event-eu", "get",
         lambda w: f"/audit/{AuditEvent.objects.get(action='site.create', site_uuid=w.berlin.uuid).uuid}/", SEE_EU),
    Case("audit-event-us", "get",
         lambda w: f"/audit/{AuditEvent.objects.get(action='site.create', site_uuid=w.ohio.uuid).uuid}/", SEE_US),
    Case("token-create-eu", "post", lambda w: f"/sites/{w.berlin.slug}/tokens", OPERATE_EU,
         data=lambda w: {"max_uses": "2", "lifetime_hours": "4", "note": "m"}, effect=_token_count),
    Case("token-create-us", "post", lambda w: f"/sites/{w.ohio.slug}/tokens", OPERATE_US,
         data=lambda w: {"max_uses": "2", "lifetime_hours": "4", "note": "m"}, effect=_token_count),
    Case("token-revoke-eu", "post", lambda w: f"/sites/{w.berlin.slug}/tokens/{w.token_berlin.uuid}/revoke",
         OPERATE_EU, effect=lambda w: EnrollmentToken.objects.get(pk=w.token_berlin.pk).revoked_at is None),
    Case("token-revoke-us", "post", lambda w: f"/sites/{w.ohio.slug}/tokens/{w.token_ohio.uuid}/revoke",
         OPERATE_US, effect=lambda w: EnrollmentToken.objects.get(pk=w.token_ohio.pk).revoked_at is None),
    Case("node-revoke-eu", "post", lambda w: f"/nodes/{w.node_berlin.uuid}/revoke", OPERATE_EU,
         effect=lambda w: Node.objects.get(pk=w.node_berlin.pk).revoked_at is None),
    Case("node-revoke-us", "post", lambda w: f"/nodes/{w.node_ohio.uuid}/revoke", OPERATE_US,
         effect=lambda w: Node.objects.get(pk=w.node_ohio.pk).revoked_at is None),
    Case("installer-eu", "post", lambda w: f"/sites/{w.berlin.slug}/installer", OPERATE_EU,
         data=lambda w: {"token": w.token_berlin_value}),
    Case("installer-us", "post", lambda w: f"/sites/{w.ohio.slug}/installer", OPERATE_US,
         data=lambda w: {"token": w.token_ohio_value}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("persona", PERSONAS)
def test_it_answers_each_persona_with_the_right_status(client: Client, request: pytest.FixtureRequest, world: World,
                                                        case: Case, persona: str) -> None:
    expected = case.statuses[PERSONAS.index(persona)]
    as_persona(client, request, persona)
    before = case.effect(world)
    # HTMX requests, so that an allowed POST answers 200 with a partial, not a redirect.
    response = getattr(client, case.method)(case.url(world), case.data(world), headers=HTMX)
    assert response.status_code == expected, response.content[:500]
    if expected == 302:
        assert response["Location"].startswith("/login/")
    if case.method == "post" and expected != 200:
        assert case.effect(world) == before, "a refused request changed something"
    if case.method == "post" and expected == 200 and before is not None:
        assert case.effect(world) != before, "an allowed request changed nothing"


def test_it_lists_only_the_sites_and_regions_in_scope(client: Client, operator: Any, world: World) -> None:
    client.force_login(operator)
    page = client.get("/").content.decode()
    assert "Plant Berlin" in page and "Plant Ohio" not in page
    assert '<option value="eu"' in page and '<option value="us"' not in page


def test_it_refuses_a_region_filter_outside_the_users_scope(client: Client, operator: Any, world: World) -> None:
    client.force_login(operator)
    response = client.get("/", {"region": "us"})
    assert response.status_code == 400
    page = response.content.decode()
    assert "region: Select a valid choice" in page
    assert "Plant Berlin" not in page and "Plant Ohio" not in page


def test_it_does_not_show_a_stranger_any_site(client: Client, stranger: Any, world: World) -> None:
    client.force_login(stranger)
    page = client.get("/").content.decode()
    assert "Plant Berlin" not in page and "Plant Ohio" not in page and "No sites yet." in page


# -- the fleet -------------------------------------------------------------------


def fleet_names(client: Client, **params: str) -> list[str]:
    response = client.get("/", params)
    assert response.status_code == 200, response.content[:500]
    return re.findall(r'<a href="/sites/[^/]+/">([^<]+)</a>', response.content.decode())


def test_it_filters_the_fleet_by_region_status_and_text(client: Client, admin_user: Any, world: World) -> None:
    client.force_login(admin_user)
    empty = make_site(world.berlin.region, "store-hamburg", name="Store Hamburg", jurisdiction="EU")
    assert fleet_names(client) == ["Plant Berlin", "Plant Ohio", "Store Hamburg"]
    assert fleet_names(client, region="eu") == ["Plant Berlin", "Store Hamburg"]
    assert fleet_names(client, region="us") == ["Plant Ohio"]
    assert fleet_names(client, status="online") == ["Plant Berlin", "Plant Ohio"]
    assert fleet_names(client, status="empty") == [empty.name]
    assert fleet_names(client, q="us") == ["Plant Ohio"]  # jurisdiction
    assert fleet_names(client, q="hamburg") == ["Store Hamburg"]  # slug and name
    assert fleet_names(client, region="eu", status="online", q="berlin") == ["Plant Berlin"]
    response = client.get("/", {"status": "sideways"})
    assert response.status_code == 400 and "status: Select a valid choice" in response.content.decode()


def test_it_counts_live_nodes_and_derives_the_site_status(client: Client, admin_user: Any, world: World) -> None:
    client.force_login(admin_user)
    stale = enroll(world.berlin, "line-3")
    seen_ago(stale, 6)  # stale after 4 s, offline after 8 s (tests/conftest.py)
    revoked = enroll(world.berlin, "old-box")
    services.node_revoke(actor=Actor.system("test"), node=revoked)
    rows = {r.site.slug: r for r in site_list(user=admin_user)}
    berlin = rows["plant-berlin"]
    assert (berlin.nodes_online, berlin.nodes_total, berlin.status) == (1, 2, "degraded")
    assert berlin.last_seen_at == Node.objects.get(pk=world.node_berlin.pk).last_seen_at
    seen_ago(world.node_berlin, 60)
    seen_ago(stale, 60)
    assert site_list(user=admin_user, status="offline")[0].site == world.berlin
    page = client.get("/", {"region": "eu"}).content.decode()
    assert "0 / 2" in page and "status-offline" in page


def test_it_reads_the_fleet_in_a_constant_number_of_queries(admin_user: Any, world: World) -> None:
    def queries() -> int:
        with CaptureQueriesContext(connection) as ctx:
            site_list(user=admin_user)
        return len(ctx.captured_queries)

    few = queries()
    for i in range(5):
        site = make_site(world.berlin.region, f"extra-{i}")
        enroll(site, f"n-{i}")
    assert queries() == few


def test_it_swaps_only_the_table_and_keeps_the_filters_when_refreshing(client: Client, admin_user: Any,
                                                                       world: World) -> None:
    client.force_login(admin_user)
    response = client.get("/", {"region": "eu", "q": "plant"}, headers=HTMX)
    page = response.content.decode()
    assert "<html" not in page and page.lstrip().startswith('<div id="fleet-table"')
    # The self-refresh asks for the same filters every 5 seconds.
    assert 'hx-get="/?region=eu&amp;q=plant" hx-trigger="every 5s"' in page
    assert "Plant Berlin" in page and "Plant Ohio" not in page
    assert "HX-Request" in response["Vary"]
    full = client.get("/", {"region": "eu"}).content.decode()
    assert "<html" in full and 'id="fleet-table"' in full and "htmx.min.js" in full


# -- site and node pages -----------------------------------------------------------


def test_it_shows_a_sites_attributes_nodes_and_tokens(client: Client, viewer: Any, world: World) -> None:
    services.site_update(actor=Actor.system("test"), site=world.berlin, labels={"line": "3"}, clearance=2)
    client.force_login(viewer)
    page = client.get(f"/sites/{world.berlin.slug}/").content.decode()
    for text in ["Europe", "DE", "Confidential", "Connected", "50.0000, 8.0000", "line=3", "gw-berlin",
                 "8 cores · 16.0 GiB · CUDA, CPU", "0.1.0", world.token_berlin.prefix, "0 / 5", "active"]:
        assert text in page, text
    # A viewer sees no operator controls.
    assert "New enrollment token" not in page and "Revoke" not in page


def test_it_shows_operators_the_token_form_and_revoke_buttons(client: Client, operator: Any, world: World) -> None:
    client.force_login(operator)
    page = client.get(f"/sites/{world.berlin.slug}/").content.decode()
    assert "New enrollment token" in page
    assert f'action="/nodes/{world.node_berlin.uuid}/revoke"' in page
    assert f'action="/sites/{world.berlin.slug}/tokens/{world.token_berlin.uuid}/revoke"' in page


def test_it_shows_a_nodes_profile_generations_and_events(client: Client, viewer: Any, world: World) -> None:
    client.force_login(viewer)
    node = world.node_berlin
    page = client.get(f"/nodes/{node.uuid}/").content.decode()
    for text in [str(node.uuid), "Plant Berlin", "Gateway", "status-online", "10.0.0.6", "Xeon", "16.0 GiB",
                 "CUDAExecutionProvider", "Linux", "x86_64", "applied 1 / desired 1", "(in sync)",
                 "node.enroll", "node.report", "desired_state.publish"]:
        assert text in page, text
    assert "Plant Ohio" not in page


def test_it_marks_a_node_that_has_not_applied_its_desired_state(client: Client, viewer: Any, world: World) -> None:
    node = enroll(world.berlin, "lagging", synced=False)
    client.force_login(viewer)
    page = client.get(f"/nodes/{node.uuid}/").content.decode()
    assert "applied 0 / desired 1" in page and "(in sync)" not in page and "status-pending" in page


def test_it_shows_what_a_node_refuses(client: Client, viewer: Any, world: World) -> None:
    node = world.node_berlin
    refusal = protocol.Refusal(generation=1, reason="epoch x is older than epoch y in force", at=timezone.now())
    node_sync(node=node, request=protocol.SyncRequest(actual=protocol.ActualState(
        applied_generation=1, refusing=refusal)), ip="10.0.0.6")
    client.force_login(viewer)
    page = client.get(f"/nodes/{node.uuid}/").content.decode()
    assert "refusing</span> generation 1: epoch x is older than epoch y in force" in page
    assert "(in sync)" not in page


# -- tokens ------------------------------------------------------------------------


def test_it_shows_a_new_token_once_and_stores_only_its_hash(client: Client, operator: Any, world: World) -> None:
    client.force_login(operator)
    response = client.post(f"/sites/{world.berlin.slug}/tokens",
                           {"max_uses": "3", "lifetime_hours": "48", "note": "line 3 boxes"}, headers=HTMX)
    assert response.status_code == 200
    page = response.content.decode()
    value = re.search(r'<code id="token-value" class="mono">(ewt_[\w-]+)</code>', page).group(1)
    token = EnrollmentToken.objects.get(note="line 3 boxes")
    assert (token.max_uses, token.site, token.created_by) == (3, world.berlin, operator)
    assert abs((token.expires_at - timezone.now()) - dt.timedelta(hours=48)) < dt.timedelta(minutes=1)
    assert token.token_hash == services.secret_hash(value) and value.startswith(token.prefix)
    assert value not in json.dumps(list(EnrollmentToken.objects.values()), default=str)
    # printf is a shell builtin: the token is on no process's command line.
    assert f"printf '%s\\n' '{value}' | edge-runtime enroll --url http://testserver --token-stdin" in page
    # The installer form carries the token in its body, never in its URL.
    assert f'<form method="post" action="/sites/{world.berlin.slug}/installer">' in page
    assert f'<input type="hidden" name="token" value="{value}">' in page
    # The token list is updated out of band.
    assert 'id="tokens-table" hx-swap-oob="true"' in page and "line 3 boxes" in page
    event = AuditEvent.objects.get(action="token.create", object_id=str(token.uuid))
    assert event.actor == "operator" and value not in json.dumps(event.after)
    assert value not in client.get(f"/sites/{world.berlin.slug}/").content.decode()


def test_it_shows_the_token_on_the_whole_page_without_htmx(client: Client, operator: Any, world: World) -> None:
    client.force_login(operator)
    response = client.post(f"/sites/{world.berlin.slug}/tokens", {"max_uses": "1", "lifetime_hours": "1"})
    page = response.content.decode()
    assert response.status_code == 200 and "<html" in page and 'id="token-value"' in page
    assert page.count('id="tokens-table"') == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_uses": "0", "lifetime_hours": "24"}, "Max uses: Ensure this value is greater than or equal to 1."),
        ({"max_uses": "20000", "lifetime_hours": "24"}, "Max uses: Ensure this value is less than or equal to 10000."),
        ({"max_uses": "many", "lifetime_hours": "24"}, "Max uses: Enter a whole number."),
        ({"max_uses": "1", "lifetime_hours": "0"}, "Lifetime (hours): Ensure this value is greater than or equal"),
        ({"max_uses": "1", "lifetime_hours": "721"}, "Lifetime (hours): Ensure this value is less than or equal"),
        ({"max_uses": "1", "lifetime_hours": "24", "note": "x" * 201}, "Note: Ensure this value has at most 200"),
    ],
    ids=["zero-uses", "too-many-uses", "not-a-number", "zero-hours", "too-long", "long-note"],
)
def test_it_refuses_a_bad_token_form_naming_the_field(client: Client, operator: Any, world: World,
                                                      data: dict[str, str], message: str) -> None:
    client.force_login(operator)
    tokens, events = EnrollmentToken.objects.count(), AuditEvent.objects.count()
    response = client.post(f"/sites/{world.berlin.slug}/tokens", data, headers=HTMX)
    assert response.status_code == 422
    page = response.content.decode()
    assert message in page and 'id="token-value"' not in page
    assert page.lstrip().startswith('<div id="token-panel">')
    assert (EnrollmentToken.objects.count(), AuditEvent.objects.count()) == (tokens, events)


def test_it_revokes_a_token_once(client: Client, operator: Any, world: World) -> None:
    client.force_login(operator)
    url = f"/sites/{world.berlin.slug}/tokens/{world.token_berlin.uuid}/revoke"
    response = client.post(url, headers=HTMX)
    assert response.status_code == 200 and "revoked" in response.content.decode()
    assert EnrollmentToken.objects.get(pk=world.token_berlin.pk).revoked_at is not None
    assert AuditEvent.objects.filter(action="token.revoke", actor="operator").count() == 1
    again = client.post(url, headers=HTMX)
    assert again.status_code == 400 and "this token is already revoked" in again.content.decode()
    assert AuditEvent.objects.filter(action="token.revoke").count() == 1


def test_it_does_not_revoke_a_token_through_another_sites_url(client: Client, admin_user: Any, world: World) -> None:
    client.force_login(admin_user)
    response = client.post(f"/sites/{world.berlin.slug}/tokens/{world.token_ohio.uuid}/revoke")
    assert response.status_code == 404
    assert EnrollmentToken.objects.get(pk=world.token_ohio.pk).revoked_at is None


def test_it_revokes_a_node_and_shows_it_revoked(client: Client, operator: Any, world: World) -> None:
    client.force_login(operator)
    response = client.post(f"/nodes/{world.node_berlin.uuid}/revoke", {"next": "site"})
    assert response.status_code == 302 and response["Location"] == f"/sites/{world.berlin.slug}/"
    assert Node.objects.get(pk=world.node_berlin.pk).revoked_at is not None
    assert AuditEvent.objects.filter(action="node.revoke", object_id=str(world.node_berlin.uuid),
                                     actor="operator").exists()
    page = client.get(f"/nodes/{world.node_berlin.uuid}/").content.decode()
    assert "status-revoked" in page and "Revoke node" not in page
    again = client.post(f"/nodes/{world.node_berlin.uuid}/revoke", {"next": "node"}, headers=HTMX)
    assert again.status_code == 400 and "already revoked" in again.content.decode()


# -- installer ---------------------------------------------------------------------


def test_it_serves_the_installer_for_a_live_token_of_that_site(client: Client, operator: Any, world: World) -> None:
    client.force_login(operator)
    response = client.post(f"/sites/{world.berlin.slug}/installer", {"token": world.token_berlin_value})
    assert response.status_code == 200
    assert response["Content-Type"] == "text/x-shellscript"
    assert response["Content-Disposition"] == 'attachment; filename="edgewise-install-plant-berlin.sh"'
    assert response["Cache-Control"] == "no-store"
    body = response.content.decode()
    assert body == render_installer(url="http://testserver", token=world.token_berlin_value,
                                    fingerprint=keys.public_key_fingerprint(), site=world.berlin)
    assert world.token_berlin_value in body


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (lambda w: w.token_ohio_value, "unknown enrollment token"),
        (lambda w: "ewt_made-up-token-value", "unknown enrollment token"),
        (lambda w: "", "an enrollment token is required"),
        (lambda w: _revoked(w), "enrollment token was revoked"),
        (lambda w: _expired(w), "enrollment token expired"),
        (lambda w: _used_up(w), "enrollment token is used up"),
    ],
    ids=["other-site", "unknown", "missing", "revoked", "expired", "used-up"],
)
def test_it_refuses_an_installer_without_a_live_token_of_that_site(client: Client, operator: Any, admin_user: Any,
                                                                   world: World, token: Any, message: str) -> None:
    client.force_login(admin_user)
    response = client.post(f"/sites/{world.berlin.slug}/installer", {"token": token(world)})
    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/plain")
    assert message in response.content.decode()


def _revoked(w: World) -> str:
    services.token_revoke(actor=Actor.system("test"), token=w.token_berlin)
    return w.token_berlin_value


def _expired(w: World) -> str:
    EnrollmentToken.objects.filter(pk=w.token_berlin.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    return w.token_berlin_value


def _used_up(w: World) -> str:
    EnrollmentToken.objects.filter(pk=w.token_berlin.pk).update(uses=5)
    return w.token_berlin_value


def test_it_does_not_serve_the_installer_by_get(client: Client, operator: Any, world: World) -> None:
    client.force_login(operator)
    response = client.get(f"/sites/{world.berlin.slug}/installer", {"token": world.token_berlin_value})
    assert response.status_code == 405


def test_it_reloads_the_node_page_after_revoking_from_it(client: Client, operator: Any, world: World) -> None:
    client.force_login(operator)
    response = client.post(f"/nodes/{world.node_berlin.uuid}/revoke", {"next": "node"}, headers=HTMX)
    assert response.status_code == 200 and response["HX-Refresh"] == "true"
    assert Node.objects.get(pk=world.node_berlin.pk).revoked_at is not None


def test_it_tells_a_viewer_why_an_operation_is_refused(client: Client, viewer: Any, world: World) -> None:
    client.force_login(viewer)
    response = client.post(f"/sites/{world.berlin.slug}/tokens", {"max_uses": "1", "lifetime_hours": "1"})
    assert response.status_code == 403
    assert "you may see site plant-berlin but not operate it" in response.content.decode()


def test_the_site_page_and_the_map_read_in_a_constant_number_of_queries(client: Client, admin_user: Any,
                                                                         world: World) -> None:
    client.force_login(admin_user)
    site_url = f"/sites/{world.berlin.slug}/"

    def queries(url: str, **headers: str) -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert client.get(url, headers=headers).status_code == 200
        return len(ctx.captured_queries)

    urls = [(site_url, {}), (site_url, HTMX), (MAP_DATA_URL, {})]
    few = [queries(url, **headers) for url, headers in urls]
    for i in range(5):
        enroll(world.berlin, f"line-{i}")
        enroll(make_site(world.berlin.region, f"more-{i}"), f"n-{i}")
    assert [queries(url, **headers) for url, headers in urls] == few

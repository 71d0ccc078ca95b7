"""The console's side of air-gapped bundles: the site page's panel, making a bundle in, uploading a bundle out,
and air-gapped sites shown as such (never offline) on the fleet, the map, the site and the node pages."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import signing
from edge_runtime.airgap.bundle import read_metadata
from edge_runtime.protocol.airgap import HeldArtifact
from models_registry import services as registry
from queries.models import FederatedQuery, QuerySite
from sites import bundle_views
from sites.bundles import bundle_export
from sites.liveness import shown_confirmed_at
from sites.models import Connectivity, Node, Region, Site, SiteBundle
from tests.fixtures.personas import make_site
from tests.models_registry.helpers import make_model, valid_version
from tests.sites.bundle_helpers import bundle_out, enroll

pytestmark = pytest.mark.django_db

ACTOR = Actor.system("test")
HTMX = {"HX-Request": "true"}


@pytest.fixture
def base7(region_eu: Region) -> Site:
    return make_site(region_eu, "base-7", name="Base 7", jurisdiction="DE", connectivity=Connectivity.AIR_GAPPED)


@pytest.fixture
def uploads(settings: Any, tmp_path: Path) -> Path:
    """Where the views put their temporary files in these tests: empty after every request."""
    directory = tmp_path / "uploads"
    directory.mkdir()
    settings.FILE_UPLOAD_TEMP_DIR = str(directory)
    return directory


def upload(client: Client, site: Site, path: Path, **headers: str) -> Any:
    with path.open("rb") as f:
        return client.post(f"/sites/{site.slug}/bundles/out", {"file": f}, headers=headers)


def make_in(client: Client, site: Site, **data: str) -> Any:
    return client.post(f"/sites/{site.slug}/bundles/in", {"valid_days": "30", **data})


def downloaded(response: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(response.streaming_content))  # the test client closes the file once it is read
    return path


# -- making a bundle in ----------------------------------------------------------


def test_it_downloads_the_sites_next_bundle_in_and_keeps_no_file(client: Client, operator: Any, base7: Site,
                                                                  uploads: Path, tmp_path: Path) -> None:
    enroll(base7, "s-1", signing.generate_private_key())
    client.force_login(operator)

    first = make_in(client, base7)
    assert first.status_code == 200
    assert first["Content-Disposition"] == 'attachment; filename="base-7-in-1.ewb"'
    assert first["Cache-Control"] == "no-store"
    assert not list(uploads.iterdir())  # the temporary directory went before the answer streamed
    meta = read_metadata(downloaded(first, tmp_path, "first.ewb")).signed
    assert (meta.direction, meta.site, meta.sequence) == ("in", "base-7", 1)
    assert meta.expires is not None and meta.expires - meta.created == dt.timedelta(days=30)

    second = make_in(client, base7, full="on", valid_days="7")
    assert second["Content-Disposition"] == 'attachment; filename="base-7-in-2.ewb"'
    assert read_metadata(downloaded(second, tmp_path, "second.ewb")).signed.sequence == 2
    rows = list(SiteBundle.objects.filter(site=base7, direction="in").order_by("sequence"))
    assert [(r.sequence, r.summary["full"], r.by) for r in rows] == [(1, False, operator), (2, True, operator)]
    event = AuditEvent.objects.get(action="bundle.export", after__sequence=2)
    assert (event.actor_type, event.actor) == ("user", operator.username)

    page = client.get(f"/sites/{base7.slug}/").content.decode()
    assert 'id="last-bundle-in"' in page and "by operator" in page


def test_it_refuses_a_bundle_in_for_a_site_without_nodes_on_the_page(client: Client, operator: Any, base7: Site,
                                                                     uploads: Path) -> None:
    client.force_login(operator)
    response = make_in(client, base7)
    assert response.status_code == 400
    assert "has no enrolled node" in response.content.decode()
    assert 'id="bundles-panel"' in response.content.decode()  # the page, with the message in its panel
    assert not SiteBundle.objects.exists()
    assert not list(uploads.iterdir())


@pytest.mark.parametrize("days", ["0", "3651", "soon"])
def test_it_refuses_a_validity_out_of_range_naming_the_field(client: Client, operator: Any, base7: Site,
                                                             uploads: Path, days: str) -> None:
    enroll(base7, "s-1", signing.generate_private_key())
    client.force_login(operator)
    response = make_in(client, base7, valid_days=days)
    assert response.status_code == 400
    assert "Valid for:" in response.content.decode()
    assert not SiteBundle.objects.exists()


# -- uploading a bundle out --------------------------------------------------------


def test_it_imports_a_bundle_out_once_and_shows_what_it_carried(client: Client, operator: Any, base7: Site,
                                                                uploads: Path, tmp_path: Path) -> None:
    key = signing.generate_private_key()
    node = enroll(base7, "s-1", key)
    written = timezone.now() - dt.timedelta(hours=5)
    path = bundle_out(tmp_path / "out-1.ewb", node, key, created=written)
    client.force_login(operator)

    response = upload(client, base7, path, **HTMX)
    body = response.content.decode()
    assert response.status_code == 200, body
    assert body.startswith('<div id="bundles-panel">')  # HTMX gets the panel only
    assert "Imported bundle out 1 of node s-1" in body and "0 query answers; report taken" in body
    row = SiteBundle.objects.get(direction="out")
    assert (row.node, row.sequence, row.by, row.made_at) == (node, 1, operator, written)
    assert Node.objects.get(pk=node.pk).last_seen_at == written
    assert not list(uploads.iterdir())

    again = upload(client, base7, path)
    assert again.status_code == 200
    assert "was imported already" in again.content.decode() and "nothing changed" in again.content.decode()
    assert SiteBundle.objects.filter(direction="out").count() == 1

    # The page lists it, and the receipt waits for the next bundle in.
    page = client.get(f"/sites/{base7.slug}/").content.decode()
    assert "No bundle out imported yet" not in page and "not sent yet" in page
    assert "air-gapped, last confirmed" in page


def test_it_refuses_a_damaged_file_naming_the_damage(client: Client, operator: Any, base7: Site, uploads: Path,
                                                     tmp_path: Path) -> None:
    key = signing.generate_private_key()
    node = enroll(base7, "s-1", key)
    data = bytearray(bundle_out(tmp_path / "out-1.ewb", node, key).read_bytes())
    data[data.index(b'"runtime_version":"0.1.0"') + 20] ^= 0x01  # a byte inside the report member
    flipped = tmp_path / "flipped.ewb"
    flipped.write_bytes(bytes(data))
    client.force_login(operator)

    response = upload(client, base7, flipped)
    assert response.status_code == 400
    assert "member report.json was altered" in response.content.decode()
    assert "nothing was taken" in response.content.decode()
    assert not SiteBundle.objects.exists()
    assert not list(uploads.iterdir())


def test_it_refuses_a_bundle_in_uploaded_as_a_bundle_out(client: Client, operator: Any, base7: Site, uploads: Path,
                                                         tmp_path: Path) -> None:
    enroll(base7, "s-1", signing.generate_private_key())
    bundle_export(actor=ACTOR, site=base7, path=tmp_path / "in-1.ewb")
    client.force_login(operator)
    response = upload(client, base7, tmp_path / "in-1.ewb", **HTMX)
    assert response.status_code == 400
    assert "this is a bundle in for site base-7" in response.content.decode()
    assert not SiteBundle.objects.filter(direction="out").exists()


def test_it_takes_through_a_sites_page_only_that_sites_bundles(client: Client, admin_user: Any, base7: Site,
                                                               region_eu: Region, uploads: Path,
                                                               tmp_path: Path) -> None:
    other = make_site(region_eu, "base-9", connectivity=Connectivity.AIR_GAPPED)
    key = signing.generate_private_key()
    path = bundle_out(tmp_path / "out-1.ewb", enroll(other, "s-9", key), key)
    client.force_login(admin_user)
    response = upload(client, base7, path)
    assert response.status_code == 400
    assert "written by a node of site base-9, not base-7" in response.content.decode()
    assert not SiteBundle.objects.exists()
    assert upload(client, other, path).status_code == 200


def test_it_hints_that_one_part_of_a_split_bundle_must_be_joined(client: Client, operator: Any, base7: Site,
                                                                 uploads: Path, tmp_path: Path) -> None:
    key = signing.generate_private_key()
    data = bundle_out(tmp_path / "out-1.ewb", enroll(base7, "s-1", key), key).read_bytes()
    part = tmp_path / "out-1.ewb.001"
    part.write_bytes(data[: data.index(b'"runtime_version"')])  # the first part ends inside the report
    client.force_login(operator)
    response = upload(client, base7, part)
    assert response.status_code == 400
    assert "truncated" in response.content.decode() and "join the parts with cat" in response.content.decode()


def test_it_stops_an_upload_past_the_limit_and_keeps_nothing(client: Client, operator: Any, base7: Site,
                                                             uploads: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    key = signing.generate_private_key()
    path = bundle_out(tmp_path / "out-1.ewb", enroll(base7, "s-1", key), key)
    monkeypatch.setattr(bundle_views, "BUNDLE_OUT_MAX_BYTES", 4096)
    client.force_login(operator)
    response = upload(client, base7, path)
    assert response.status_code == 400
    assert "larger than a bundle out may be" in response.content.decode()
    assert not SiteBundle.objects.exists()
    assert not list(uploads.iterdir())


def test_it_refuses_an_upload_without_a_file(client: Client, operator: Any, base7: Site) -> None:
    client.force_login(operator)
    response = client.post(f"/sites/{base7.slug}/bundles/out", {})
    assert response.status_code == 400
    assert "Choose the bundle out file" in response.content.decode()


def test_it_checks_the_csrf_token_of_an_upload(operator: Any, base7: Site, uploads: Path, tmp_path: Path) -> None:
    key = signing.generate_private_key()
    path = bundle_out(tmp_path / "out-1.ewb", enroll(base7, "s-1", key), key)
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    assert upload(client, base7, path).status_code == 403
    assert client.post(f"/sites/{base7.slug}/bundles/in", {"valid_days": "30"}).status_code == 403
    assert not SiteBundle.objects.exists()


# -- permissions ------------------------------------------------------------------


@pytest.mark.parametrize(("persona", "status"), [("viewer", 403), ("approver", 403), ("stranger", 404),
                                                 ("anonymous", 302)])
def test_it_lets_only_operators_make_or_upload_bundles(client: Client, request: pytest.FixtureRequest, base7: Site,
                                                       uploads: Path, tmp_path: Path, persona: str,
                                                       status: int) -> None:
    key = signing.generate_private_key()
    path = bundle_out(tmp_path / "out-1.ewb", enroll(base7, "s-1", key), key)
    if persona != "anonymous":
        client.force_login(request.getfixturevalue(persona))
    assert make_in(client, base7).status_code == status
    assert upload(client, base7, path).status_code == status
    assert not SiteBundle.objects.exists()
    assert not list(uploads.iterdir())


def test_it_shows_the_panel_to_viewers_without_the_forms(client: Client, viewer: Any, operator: Any,
                                                         base7: Site) -> None:
    enroll(base7, "s-1", signing.generate_private_key())
    client.force_login(viewer)
    page = client.get(f"/sites/{base7.slug}/").content.decode()
    assert 'id="bundles-panel"' in page and "No bundle in made yet" in page
    assert "Make bundle in" not in page and "Upload bundle out" not in page
    assert "bundles/in" not in page and "bundles/out" not in page
    client.force_login(operator)
    page = client.get(f"/sites/{base7.slug}/").content.decode()
    assert "Make bundle in" in page and "Upload bundle out" in page and "cat FILE.001 FILE.002" in page


def test_it_shows_no_panel_for_a_connected_site_without_bundles(client: Client, viewer: Any,
                                                                site_berlin: Site) -> None:
    client.force_login(viewer)
    assert 'id="bundles-panel"' not in client.get(f"/sites/{site_berlin.slug}/").content.decode()


# -- what is pending ----------------------------------------------------------------


def test_it_shows_what_waits_to_go_to_the_site_until_a_bundle_out_confirms_it(
        client: Client, operator: Any, base7: Site, uploads: Path, tmp_path: Path) -> None:
    key = signing.generate_private_key()
    node = enroll(base7, "s-1", key)
    version = valid_version(make_model("sonar"), version="1.0.0")
    registry.deployment_create(actor=ACTOR, version=version, sites=[base7])
    client.force_login(operator)

    page = client.get(f"/sites/{base7.slug}/").content.decode()
    assert "1 node with a newer desired state" in page
    assert "1 artifact not confirmed held" in page and "sonar@1.0.0" in page

    # The node confirms holding the model in its bundle out: nothing of it is pending any more.
    held = [HeldArtifact(sha256=version.sha256, size=version.size)]
    assert upload(client, base7, bundle_out(tmp_path / "out-1.ewb", node, key, held=held)).status_code == 200
    page = client.get(f"/sites/{base7.slug}/").content.decode()
    assert "0 artifacts not confirmed held" in page and "sonar@1.0.0" not in page
    assert "1 receipt not sent yet" in page

    # The next bundle in carries the receipt back.
    b"".join(make_in(client, base7).streaming_content)
    page = client.get(f"/sites/{base7.slug}/").content.decode()
    assert "every receipt is on its way" in page and "in bundle in 1" in page


def test_it_counts_the_queries_waiting_each_way(client: Client, viewer: Any, base7: Site) -> None:
    node = enroll(base7, "s-1", signing.generate_private_key())
    later = timezone.now() + dt.timedelta(days=3)
    query = FederatedQuery.objects.create(spec={}, dataset="sales", deadline=later, wait_until=later)
    QuerySite.objects.create(query=query, site=base7, node=node, state="bundle", deadline=later)
    carried = FederatedQuery.objects.create(spec={}, dataset="sales", deadline=later, wait_until=later)
    QuerySite.objects.create(query=carried, site=base7, node=node, state="bundle", deadline=later,
                             sent_at=timezone.now())
    past = FederatedQuery.objects.create(spec={}, dataset="sales", deadline=later, wait_until=later)
    QuerySite.objects.create(query=past, site=base7, node=node, state="bundle",
                             deadline=timezone.now() - dt.timedelta(minutes=1))
    client.force_login(viewer)
    page = client.get(f"/sites/{base7.slug}/").content.decode()
    assert "1 query waiting, in no bundle in yet" in page
    assert "1 query carried in a bundle in, waiting for an answer" in page


# -- air-gapped, never offline -------------------------------------------------------


def test_it_shows_an_air_gapped_site_as_such_on_the_fleet_and_the_map(client: Client, viewer: Any,
                                                                      base7: Site) -> None:
    node = enroll(base7, "s-1", signing.generate_private_key())
    seen = timezone.now() - dt.timedelta(days=3)
    Node.objects.filter(pk=node.pk).update(last_seen_at=seen)
    client.force_login(viewer)

    fleet = client.get("/").content.decode()
    assert "air-gapped, last confirmed" in fleet and "3 d ago" in fleet
    assert "status-offline" not in fleet
    assert client.get("/?status=air-gapped").content.decode().count("base-7") >= 1
    assert "Base 7" not in client.get("/?status=offline").content.decode()

    data = client.get("/map/sites.json").json()
    (entry,) = [s for s in data["sites"] if s["slug"] == "base-7"]
    assert (entry["status"], entry["label"]) == ("air-gapped", "air-gapped, last confirmed")
    assert dt.datetime.fromisoformat(entry["confirmed_at"]) == seen
    assert "offline" not in json.dumps(entry)
    assert "air-gapped (bundles only)" in client.get("/map/").content.decode()

    site_page = client.get(f"/sites/{base7.slug}/").content.decode()
    node_page = client.get(f"/nodes/{node.uuid}/").content.decode()
    for page in (site_page, node_page):
        assert "air-gapped, last confirmed" in page and "status-offline" not in page


def test_it_says_when_nothing_was_confirmed_yet(client: Client, viewer: Any, base7: Site) -> None:
    node = enroll(base7, "s-1")
    client.force_login(viewer)
    assert "air-gapped, nothing confirmed yet" in client.get("/").content.decode()
    assert "air-gapped, nothing confirmed yet" in client.get(f"/nodes/{node.uuid}/").content.decode()
    (entry,) = [s for s in client.get("/map/sites.json").json()["sites"] if s["slug"] == "base-7"]
    assert entry["label"] == "air-gapped, nothing confirmed yet" and entry["confirmed_at"] is None


def test_it_confirms_an_air_gapped_site_by_its_bundles_time_not_the_telemetrys_import() -> None:
    written, imported = timezone.now() - dt.timedelta(days=2), timezone.now()
    assert shown_confirmed_at(connectivity=Connectivity.AIR_GAPPED, last_seen=[written, None],
                              telemetry=[imported]) == written
    assert shown_confirmed_at(connectivity=Connectivity.CONNECTED, last_seen=[written], telemetry=[imported]) \
        == imported

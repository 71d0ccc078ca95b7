"""The artifact download endpoint: only the node's own artifacts, resumable."""

from __future__ import annotations

import pytest
from django.test import Client

from models_registry import services, storage
from sites.models import Site
from tests.models_registry.helpers import ACTOR, make_node, valid_version

pytestmark = pytest.mark.django_db


def _get(client: Client, node_id: object, sha256: str, credential: str, **headers: str) -> object:
    return client.get(f"/agent/v1/nodes/{node_id}/artifacts/{sha256}",
                      headers={"Authorization": f"Bearer {credential}", **headers})


@pytest.fixture
def deployed(site_berlin: Site, site_ohio: Site) -> dict[str, object]:
    mine, mine_credential = make_node(site_berlin, "gw-1")
    other, other_credential = make_node(site_ohio, "gw-9")
    version = valid_version()
    services.deployment_create(actor=ACTOR, version=version, nodes=[mine])
    return {"node": mine, "credential": mine_credential, "other": other, "other_credential": other_credential,
            "version": version, "data": storage.artifact_path(version.sha256).read_bytes()}


def test_it_serves_a_nodes_own_artifact(client: Client, deployed: dict[str, object]) -> None:
    response = _get(client, deployed["node"].uuid, deployed["version"].sha256, deployed["credential"])
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == deployed["data"]
    assert response["Accept-Ranges"] == "bytes" and response["Content-Length"] == str(len(deployed["data"]))
    assert response["ETag"] == f'"{deployed["version"].sha256}"'


def test_it_hides_artifacts_another_node_was_not_given(client: Client, deployed: dict[str, object]) -> None:
    sha = deployed["version"].sha256
    # The other node, on its own URL, asking for an artifact it was not given.
    response = _get(client, deployed["other"].uuid, sha, deployed["other_credential"])
    assert response.status_code == 404 and response.json() == {"error": "no such artifact in this node's desired state"}
    # The other node's credential on this node's URL.
    assert _get(client, deployed["node"].uuid, sha, deployed["other_credential"]).status_code == 404
    # No credential at all.
    assert client.get(f"/agent/v1/nodes/{deployed['node'].uuid}/artifacts/{sha}").status_code == 401
    # A hash that is not one.
    response = _get(client, deployed["node"].uuid, "../../etc/passwd", deployed["credential"])
    assert response.status_code in (400, 404)


def test_it_stops_serving_a_removed_deployment(client: Client, deployed: dict[str, object]) -> None:
    deployment = deployed["version"].deployments.get()
    services.deployment_remove(actor=ACTOR, deployment=deployment)
    response = _get(client, deployed["node"].uuid, deployed["version"].sha256, deployed["credential"])
    assert response.status_code == 404


@pytest.mark.parametrize(("header", "first", "last"), [("bytes=10-19", 10, 19), ("bytes=100-", 100, None),
                                                       ("bytes=-7", -7, None)])
def test_it_resumes_with_a_range(client: Client, deployed: dict[str, object], header: str, first: int,
                                 last: int | None) -> None:
    data: bytes = deployed["data"]  # type: ignore[assignment]
    response = _get(client, deployed["node"].uuid, deployed["version"].sha256, deployed["credential"],
                    Range=header)
    assert response.status_code == 206
    expected = data[first:] if last is None else data[first:last + 1]
    assert b"".join(response.streaming_content) == expected
    start = first if first >= 0 else len(data) + first
    assert response["Content-Range"] == f"bytes {start}-{start + len(expected) - 1}/{len(data)}"
    assert response["Content-Length"] == str(len(expected))


@pytest.mark.parametrize("header", ["bytes=999999999-", "bytes=5-2", "bytes=0-1,4-5", "pages=1-2"])
def test_it_rejects_an_unsatisfiable_range(client: Client, deployed: dict[str, object], header: str) -> None:
    data: bytes = deployed["data"]  # type: ignore[assignment]
    response = _get(client, deployed["node"].uuid, deployed["version"].sha256, deployed["credential"],
                    Range=header)
    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{len(data)}"


def test_it_sends_the_whole_file_when_if_range_is_stale(client: Client, deployed: dict[str, object]) -> None:
    response = _get(client, deployed["node"].uuid, deployed["version"].sha256, deployed["credential"],
                    Range="bytes=10-19", **{"If-Range": '"somethingelse"'})
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == deployed["data"]

"""The node page's Models panel: desired models joined with what the node reports."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest
from django.test import Client

from audit.services import Actor
from edge_runtime import protocol
from models_registry import services as registry
from models_registry.models import ModelVersion
from sites import services
from sites.models import Node, Site
from sites.sync import node_sync
from tests.fixtures.personas import PASSWORD
from tests.models_registry import onnx_factory
from tests.models_registry.helpers import make_model, valid_version

pytestmark = pytest.mark.django_db

HTMX = {"HX-Request": "true"}
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def enroll(site: Site, name: str) -> Node:
    """A node enrolled the way a real one is, on a CPU-only machine."""
    _, value = services.token_create(actor=Actor.system("test"), site=site)
    hardware = protocol.Hardware(cpu_model="Xeon", cpu_cores=8, memory_mb=16384, os="Linux", arch="x86_64",
                                 execution_providers=[CPU])
    node, _ = services.node_enroll(
        request=protocol.EnrollRequest(token=value, name=name, role="server", runtime_version="0.1.0",
                                       hardware=hardware),
        ip="10.0.0.5",
    )
    return Node.objects.get(pk=node.pk)


def deploy(site: Site, slug: str, *, seed: int, **requirements: Any) -> ModelVersion:
    version = valid_version(make_model(slug), onnx_factory.linear(in_features=4, out_features=2, seed=seed),
                            **requirements)
    registry.deployment_create(actor=Actor.system("test"), version=version, sites=[site])
    return version


def report(node: Node, *statuses: protocol.ModelStatus) -> None:
    """The node's sync, through the agent API's service."""
    node_sync(node=node, request=protocol.SyncRequest(
        actual=protocol.ActualState(applied_generation=1, models=list(statuses))), ip="10.0.0.6")


def rows(page: str) -> dict[str, str]:
    """The panel's table rows by model name, tags stripped and whitespace collapsed."""
    panel = page[page.index('id="node-models"'):]
    found = {}
    for name, body in re.findall(r'<tr data-model="([^"]+)">(.*?)</tr>', panel, re.S):
        text = re.sub(r"<[^>]+>", " ", body)
        found[name] = " ".join(html.unescape(text).split())
    return found


def page_for(client: Client, node: Node, **headers: str) -> str:
    response = client.get(f"/nodes/{node.uuid}/", headers=headers)
    assert response.status_code == 200
    return response.content.decode()


@pytest.fixture
def world(site_berlin: Site) -> dict[str, Any]:
    node = enroll(site_berlin, "srv-1")
    versions = {
        # Prefers CUDA: on this CPU-only node it falls back to CPU.
        "defects": deploy(site_berlin, "defects", seed=1, preferred_providers=[CUDA, CPU]),
        "wear": deploy(site_berlin, "wear", seed=2),
        "vision": deploy(site_berlin, "vision", seed=3),
        "audio": deploy(site_berlin, "audio", seed=4),
    }
    return {"node": Node.objects.get(pk=node.pk), "versions": versions}


@pytest.fixture
def admin_client(admin_user: Any) -> Client:
    client = Client()
    assert client.login(username="admin", password=PASSWORD)
    return client


def test_it_shows_serving_failed_and_refused_models_with_their_errors(world: dict[str, Any],
                                                                       admin_client: Client) -> None:
    node, versions = world["node"], world["versions"]
    sha = {name: v.sha256 for name, v in versions.items()}
    report(
        node,
        protocol.ModelStatus(name="defects", version=versions["defects"].version, sha256=sha["defects"],
                             provider=CPU, state="serving"),
        protocol.ModelStatus(name="wear", version=versions["wear"].version, sha256=sha["wear"], state="failed",
                             error="smoke test failed: Got invalid dimensions for input: x", serving_version="0.9"),
        protocol.ModelStatus(name="vision", version=versions["vision"].version, sha256=sha["vision"],
                             state="refused", error="the artifact's sha256 does not match the desired state"),
    )
    found = rows(page_for(admin_client, node))

    assert set(found) == {"defects", "wear", "vision", "audio"}
    assert found["defects"] == (f"defects {versions['defects'].version} original {versions['defects'].version} "
                                f"original {CPU} CPU fallback The model prefers {CUDA}, which this node cannot use "
                                "serving")
    assert "failed smoke test failed: Got invalid dimensions for input: x" in found["wear"]
    # The version that keeps answering while the new one failed.
    assert f"wear {versions['wear'].version} original 0.9 " in found["wear"]
    assert "refused the artifact's sha256 does not match the desired state" in found["vision"]
    # Desired but not in the node's report yet.
    assert found["audio"].endswith("— — pending")


def test_it_links_each_model_to_its_page(world: dict[str, Any], admin_client: Client) -> None:
    page = page_for(admin_client, world["node"])
    for name in ("defects", "wear", "vision", "audio"):
        assert f'<a href="/models/{name}/">{name}</a>' in page
    assert admin_client.get("/models/defects/").status_code == 200


def test_it_flags_a_cpu_fallback_only_when_the_model_preferred_another_provider(
    world: dict[str, Any], admin_client: Client
) -> None:
    node, versions = world["node"], world["versions"]
    report(
        node,
        protocol.ModelStatus(name="defects", version=versions["defects"].version, provider=CUDA, state="serving"),
        # No preference given: CPU is what the model asked for, not a fallback.
        protocol.ModelStatus(name="wear", version=versions["wear"].version, provider=CPU, state="serving"),
    )
    found = rows(page_for(admin_client, node))
    assert CUDA in found["defects"] and "CPU fallback" not in found["defects"]
    assert CPU in found["wear"] and "CPU fallback" not in found["wear"]

    report(node, protocol.ModelStatus(name="defects", version=versions["defects"].version, provider=CPU,
                                      state="serving"))
    assert "CPU fallback" in rows(page_for(admin_client, node))["defects"]


def test_it_flags_partial_placement_and_a_fallback_with_the_nodes_reason(
    world: dict[str, Any], admin_client: Client
) -> None:
    node, versions = world["node"], world["versions"]
    ov = "OpenVINOExecutionProvider"
    why = f"{ov}: changes the results on the range probe inputs: output 'y' has 0 NaN where CPU has 3"
    report(
        node,
        protocol.ModelStatus(name="defects", version=versions["defects"].version, provider=ov, state="serving",
                             placement="partial", cpu_nodes=1, graph_nodes=4),
        protocol.ModelStatus(name="wear", version=versions["wear"].version, provider=CPU, state="serving",
                             placement="cpu_fallback", cpu_nodes=5, graph_nodes=5, fallback=why),
        protocol.ModelStatus(name="vision", version=versions["vision"].version, provider=ov, state="serving",
                             placement="full", graph_nodes=7),
    )
    found = rows(page_for(admin_client, node))
    assert f"{ov} Partial: 1 of 4 nodes on CPU {ov} runs the rest of the graph serving" in found["defects"]
    assert f"{CPU} CPU fallback {why} serving" in html.unescape(found["wear"])
    assert "CPU" not in found["vision"].replace(ov, "") and "fallback" not in found["vision"]


def test_it_shows_a_model_the_node_still_reports_after_its_deployment_was_removed(
    world: dict[str, Any], admin_client: Client
) -> None:
    node, versions = world["node"], world["versions"]
    deployment = versions["audio"].deployments.get()
    registry.deployment_remove(actor=Actor.system("test"), deployment=deployment)
    report(node, protocol.ModelStatus(name="audio", version=versions["audio"].version, provider=CPU,
                                      state="serving"))
    found = rows(page_for(admin_client, Node.objects.get(pk=node.pk)))
    assert found["audio"].startswith("audio not desired (being removed)")
    assert "serving" in found["audio"]


def test_it_says_so_when_no_model_is_deployed(site_berlin: Site, admin_client: Client) -> None:
    node = enroll(site_berlin, "gw-1")
    page = page_for(admin_client, node)
    assert rows(page) == {}
    assert "No model is deployed to this node." in page


def test_it_refreshes_the_panel_alone_every_five_seconds(world: dict[str, Any], admin_client: Client) -> None:
    node, versions = world["node"], world["versions"]
    full = page_for(admin_client, node)
    assert f'hx-get="/nodes/{node.uuid}/" hx-trigger="every 5s"' in full

    report(node, protocol.ModelStatus(name="wear", version=versions["wear"].version, state="refused",
                                      error="needs CUDAExecutionProvider"))
    assert "hx-swap-oob" not in full
    partial = page_for(admin_client, node, **HTMX)
    assert partial.lstrip().startswith('<div id="node-models"')
    assert "<html" not in partial and "Latest audit events" not in partial
    assert "refused needs CUDAExecutionProvider" in rows(partial)["wear"]
    # The generation and the raw actual state beside the panel follow it, out of band.
    node.refresh_from_db()
    generation = re.search(r'<dd id="node-generation"[^>]*hx-swap-oob="true">(.*?)</dd>', partial, re.S)
    assert generation is not None
    assert f"applied 1 / desired {node.desired.generation}" in generation.group(1)
    actual = re.search(r'<div id="node-actual" hx-swap-oob="true">(.*?)</div>', partial, re.S)
    assert actual is not None and "needs CUDAExecutionProvider" in actual.group(1)


def test_it_stops_refreshing_the_panel_of_a_revoked_node(world: dict[str, Any], admin_client: Client) -> None:
    node = world["node"]
    services.node_revoke(actor=Actor.system("test"), node=node)
    page = page_for(admin_client, node)
    assert 'id="node-models"' in page and 'hx-trigger="every 5s"' not in page


@pytest.mark.parametrize(("persona", "status"), [
    ("admin_user", 200), ("viewer", 200), ("operator", 200), ("stranger", 404), ("anonymous", 302),
])
def test_it_shows_the_panel_only_to_people_who_see_the_node(request: pytest.FixtureRequest, world: dict[str, Any],
                                                            persona: str, status: int) -> None:
    node, versions = world["node"], world["versions"]
    report(node, protocol.ModelStatus(name="vision", version=versions["vision"].version, state="refused",
                                      error="the artifact's signature does not verify"))
    client = Client()
    if persona != "anonymous":
        user = request.getfixturevalue(persona)
        assert client.login(username=user.get_username(), password=PASSWORD)
    for headers in ({}, HTMX):
        response = client.get(f"/nodes/{node.uuid}/", headers=headers)
        assert response.status_code == status
        if status == 200:
            assert "the artifact&#x27;s signature does not verify" in response.content.decode()
        else:
            assert b"signature does not verify" not in response.content

"""The registry's console pages, and who may do what there."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from models_registry.models import Deployment, Model, ModelVersion, VersionStatus
from rollouts.models import Rollout, RolloutKind
from sites.models import Site
from tests.fixtures.personas import PASSWORD, make_user
from tests.models_registry import onnx_factory
from tests.models_registry.helpers import make_model, make_node, upload, valid_version

pytestmark = pytest.mark.django_db

PERSONAS = ["admin_user", "estate_operator", "operator", "viewer", "stranger", "anonymous"]


@pytest.fixture
def estate_operator(db: None) -> Any:
    return make_user("estate-operator", groups=("Operator",))


@pytest.fixture
def as_persona(request: pytest.FixtureRequest, client: Client, site_berlin: Site, site_ohio: Site) -> Any:
    def login(name: str) -> Client:
        if name != "anonymous":
            user = request.getfixturevalue(name)
            assert client.login(username=user.username, password=PASSWORD)
        return client

    return login


@pytest.mark.parametrize(("persona", "status"), [
    ("admin_user", 200), ("estate_operator", 200), ("operator", 200), ("viewer", 200), ("stranger", 403),
    ("anonymous", 302),
])
def test_it_shows_the_registry_to_people_who_see_a_site(as_persona: Any, persona: str, status: int) -> None:
    model = make_model("detector", name="Defect detector")
    valid_version(model)
    client = as_persona(persona)
    for url in ("/models/", "/models/detector/"):
        response = client.get(url)
        assert response.status_code == status, (url, response.status_code)
        if status == 200:
            assert "Defect detector" in response.content.decode()


@pytest.mark.parametrize(("persona", "status"), [
    ("admin_user", 200), ("estate_operator", 200), ("operator", 403), ("viewer", 403), ("stranger", 403),
    ("anonymous", 302),
])
def test_it_lets_only_estate_operators_create_models(as_persona: Any, persona: str, status: int) -> None:
    client = as_persona(persona)
    assert client.get("/models/new").status_code == status
    response = client.post("/models/new", {"slug": "counter", "name": "People counter", "classification": "1"})
    assert response.status_code == (302 if status == 200 else status)
    assert Model.objects.filter(slug="counter").exists() == (status == 200)


def test_it_explains_a_bad_model_name(as_persona: Any) -> None:
    response = as_persona("admin_user").post("/models/new", {"slug": "Bad Name", "name": "x", "classification": "1"})
    assert response.status_code == 422
    assert "Name on the wire" in response.content.decode() and not Model.objects.exists()


@pytest.mark.parametrize(("persona", "status"), [
    ("admin_user", 302), ("estate_operator", 302), ("operator", 403), ("viewer", 403), ("stranger", 403),
    ("anonymous", 302),
])
def test_it_lets_only_estate_operators_upload(as_persona: Any, persona: str, status: int) -> None:
    make_model("detector")
    client = as_persona(persona)
    response = client.post("/models/detector/versions", {
        "file": SimpleUploadedFile("m.onnx", onnx_factory.linear()), "version": "1.0", "min_memory_mb": "0",
        "max_batch_size": "8", "max_queue_delay_ms": "0", "node_roles": ["device", "server"],
        "preferred_providers": "CUDAExecutionProvider, CPUExecutionProvider", "allow_quantized": "on"})
    assert response.status_code == status
    uploaded = ModelVersion.objects.filter(model__slug="detector", version="1.0").first()
    if persona in ("admin_user", "estate_operator"):
        assert uploaded is not None and uploaded.status == VersionStatus.UPLOADED
        assert uploaded.node_roles == ["device", "server"] and uploaded.allow_quantized
        assert uploaded.preferred_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        assert uploaded is None


def test_it_shows_an_oversized_upload_error_in_the_form(as_persona: Any, settings: Any) -> None:
    settings.MAX_MODEL_BYTES = 64
    make_model("detector")
    response = as_persona("admin_user").post("/models/detector/versions", {
        "file": SimpleUploadedFile("m.onnx", onnx_factory.linear()), "version": "1.0", "min_memory_mb": "0",
        "max_batch_size": "8", "max_queue_delay_ms": "0"}, headers={"HX-Request": "true"})
    assert response.status_code == 422
    assert "larger than the limit of 64 bytes" in response.content.decode()
    assert not ModelVersion.objects.exists()


def test_it_shows_versions_signature_log_and_placements(as_persona: Any, site_berlin: Site) -> None:
    from audit.services import Actor
    from models_registry import services

    make_node(site_berlin, "gw-1")
    model = make_model("detector")
    version = valid_version(model, allow_quantized=True)
    services.deployment_create(actor=Actor.system("test"), version=version, sites=[site_berlin])
    bad = upload(model, onnx_factory.truncated(), version="9.9")
    services.model_version_validate(version_id=bad.pk)
    page = as_persona("viewer").get("/models/detector/").content.decode()
    assert version.sha256 in page and "FP32" in page and "[-1, 32]" in page
    assert "int8" in page and "plant-berlin/gw-1" in page
    assert "truncated or corrupt" in page
    # A viewer sees deployments but gets no remove button.
    assert "Remove" not in page


def test_it_polls_while_validating_and_reloads_when_done(as_persona: Any) -> None:
    model = make_model("detector")
    version = upload(model, version="1.0")
    client = as_persona("viewer")
    page = client.get("/models/detector/").content.decode()
    assert 'hx-trigger="every 2s"' in page
    partial = client.get("/models/detector/?poll=1", headers={"HX-Request": "true"})
    assert partial.status_code == 200 and 'id="versions-panel"' in partial.content.decode()
    assert "<html" not in partial.content.decode()
    from models_registry import services

    services.model_version_validate(version_id=version.pk)
    done = client.get("/models/detector/?poll=1", headers={"HX-Request": "true"})
    assert done.headers.get("HX-Refresh") == "true"
    assert 'hx-trigger="every 2s"' not in client.get("/models/detector/").content.decode()


@pytest.mark.parametrize(("persona", "site_fixture", "status"), [
    ("admin_user", "site_berlin", 302), ("admin_user", "site_ohio", 302),
    ("operator", "site_berlin", 302), ("operator", "site_ohio", 404),
    ("viewer", "site_berlin", 403), ("viewer", "site_ohio", 404),
    ("stranger", "site_berlin", 403), ("anonymous", "site_berlin", 302),
])
def test_it_deploys_only_to_sites_the_user_operates(request: pytest.FixtureRequest, as_persona: Any, persona: str,
                                                    site_fixture: str, status: int) -> None:
    site: Site = request.getfixturevalue(site_fixture)
    make_node(site, "gw-1")
    version = valid_version(make_model("detector"))
    response = as_persona(persona).post("/rollouts/deploy/detector",
                                        {"version": str(version.uuid), "sites": [site.slug]})
    assert response.status_code == status
    # A deploy is a one-wave rollout (tests/rollouts/test_deploy.py follows it to its deployments).
    created = Rollout.objects.filter(version=version, kind=RolloutKind.DEPLOY, target__sites=[site.slug]).exists()
    assert created == (status == 302 and persona != "anonymous")


def test_it_refuses_to_deploy_a_version_that_is_not_valid(as_persona: Any, site_berlin: Site) -> None:
    make_node(site_berlin, "gw-1")
    version = upload(make_model("detector"), version="1.0")
    response = as_persona("operator").post("/rollouts/deploy/detector",
                                           {"version": str(version.uuid), "sites": [site_berlin.slug]},
                                           headers={"HX-Request": "true"})
    assert response.status_code == 422
    assert "is uploaded; only a valid version can be rolled out" in response.content.decode()
    assert not Deployment.objects.exists() and not Rollout.objects.exists()


@pytest.mark.parametrize(("persona", "status"), [
    ("admin_user", 302), ("operator", 302), ("viewer", 403), ("stranger", 403), ("anonymous", 302),
])
def test_it_removes_a_deployment_only_for_operators(as_persona: Any, site_berlin: Site, persona: str,
                                                    status: int) -> None:
    from audit.services import Actor
    from models_registry import services

    version = valid_version(make_model("detector"))
    [deployment] = services.deployment_create(actor=Actor.system("test"), version=version, sites=[site_berlin])
    response = as_persona(persona).post(f"/models/detector/deployments/{deployment.uuid}/remove")
    assert response.status_code == status
    deployment.refresh_from_db()
    assert (deployment.removed_at is not None) == (persona in ("admin_user", "operator"))


def test_it_hides_a_deployment_on_a_site_the_user_cannot_see(as_persona: Any, site_ohio: Site) -> None:
    from audit.services import Actor
    from models_registry import services

    version = valid_version(make_model("detector"))
    [deployment] = services.deployment_create(actor=Actor.system("test"), version=version, sites=[site_ohio])
    client = as_persona("operator")
    assert "plant-ohio" not in client.get("/models/detector/").content.decode()
    assert client.post(f"/models/detector/deployments/{deployment.uuid}/remove").status_code == 404

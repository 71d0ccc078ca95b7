"""The registry in the Django admin goes through the same services."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from audit.models import AuditEvent
from models_registry.models import Model, ModelVersion, VersionStatus
from tests.fixtures.personas import PASSWORD
from tests.models_registry import onnx_factory
from tests.models_registry.helpers import make_model, valid_version

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_(client: Client, admin_user: Any) -> Client:
    assert client.login(username=admin_user.username, password=PASSWORD)
    return client


def test_it_uploads_a_version_through_the_service(admin_client_: Client) -> None:
    model = make_model("detector")
    response = admin_client_.post("/admin/models_registry/modelversion/add/", {
        "model": str(model.pk), "file": SimpleUploadedFile("m.onnx", onnx_factory.linear()), "version": "3.1",
        "min_memory_mb": "0", "max_batch_size": "8", "max_queue_delay_ms": "0"})
    assert response.status_code == 302, response.content.decode()[:2000]
    version = ModelVersion.objects.get(model=model, version="3.1")
    assert version.status == VersionStatus.UPLOADED and version.events.count() == 1
    assert AuditEvent.objects.filter(action="model_version.upload", object_id=str(version.uuid)).exists()


def test_it_refuses_a_duplicate_version_in_the_admin_form(admin_client_: Client) -> None:
    version = valid_version(make_model("detector"))
    response = admin_client_.post("/admin/models_registry/modelversion/add/", {
        "model": str(version.model.pk), "file": SimpleUploadedFile("m.onnx", onnx_factory.linear()),
        "version": version.version, "min_memory_mb": "0", "max_batch_size": "8", "max_queue_delay_ms": "0"})
    assert response.status_code == 200 and "already has a version" in response.content.decode()
    assert ModelVersion.objects.count() == 1


def test_it_creates_a_model_through_the_service(admin_client_: Client) -> None:
    response = admin_client_.post("/admin/models_registry/model/add/",
                                  {"slug": "counter", "name": "Counter", "description": "", "classification": "1"})
    assert response.status_code == 302
    model = Model.objects.get(slug="counter")
    assert AuditEvent.objects.filter(action="model.create", object_id=str(model.uuid)).count() == 1


def test_it_shows_artifacts_read_only(admin_client_: Client) -> None:
    version = valid_version(make_model("detector"), allow_quantized=True)
    for path in ("modelversion", "modelvariant", "modelversionevent", "deployment", "nodemodelreport", "model"):
        assert admin_client_.get(f"/admin/models_registry/{path}/").status_code == 200
    page = admin_client_.get(f"/admin/models_registry/modelversion/{version.pk}/change/").content.decode()
    assert version.sha256 in page and 'name="sha256"' not in page


def test_it_withdraws_a_model_whose_classification_the_admin_raises_above_a_sites_clearance(
    admin_client_: Client, site_berlin: Any
) -> None:
    from models_registry import services
    from orchestrator.desired_state import desired_state_publish
    from orchestrator.models import DesiredState
    from sites.models import Clearance
    from tests.models_registry.helpers import ACTOR, make_node
    from tests.models_registry.test_deployment import _desired

    node, _ = make_node(site_berlin, "gw-1")
    model = make_model("detector", classification=Clearance.INTERNAL)
    services.deployment_create(actor=ACTOR, version=valid_version(model), sites=[site_berlin])
    desired_state_publish(node=node, actor=ACTOR)
    before = _desired(node)
    assert [m.name for m in before.models] == ["detector"]

    response = admin_client_.post(f"/admin/models_registry/model/{model.pk}/change/", {
        "name": model.name, "description": model.description, "classification": str(Clearance.SECRET),
        "_save": "Save"})
    assert response.status_code == 302, response.content.decode()[:3000]
    model.refresh_from_db()
    assert model.classification == Clearance.SECRET
    after = _desired(node)
    assert after.generation == before.generation + 1 and after.models == []
    (event,) = AuditEvent.objects.filter(action="model.update", object_id=str(model.uuid))
    assert event.before == {"classification": Clearance.INTERNAL}
    assert event.after == {"classification": Clearance.SECRET}
    assert DesiredState.objects.count() == 1


def test_it_writes_no_model_event_for_an_unchanged_save(admin_client_: Client) -> None:
    model = make_model("detector")
    response = admin_client_.post(f"/admin/models_registry/model/{model.pk}/change/", {
        "name": model.name, "description": model.description, "classification": str(model.classification),
        "_save": "Save"})
    assert response.status_code == 302
    assert not AuditEvent.objects.filter(action="model.update", object_id=str(model.uuid)).exists()

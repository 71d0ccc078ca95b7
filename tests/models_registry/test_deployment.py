"""Deployments, placement and what nodes report back."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from audit.models import AuditEvent
from edge_runtime import protocol, signing
from models_registry import services
from models_registry.models import Deployment
from models_registry.selectors import deployment_placement, desired_models_for_node, model_placements
from orchestrator import keys
from orchestrator.desired_state import desired_state_publish
from orchestrator.models import DesiredState
from sites.models import Clearance, Node, Site
from tests.models_registry.helpers import ACTOR, make_model, make_node, valid_version

pytestmark = pytest.mark.django_db


def _desired(node: Node) -> protocol.DesiredState:
    row = DesiredState.objects.get(node=node)
    signed = protocol.SignedDesiredState(payload=row.payload, signature=row.signature,
                                         key_fingerprint=row.key_fingerprint)
    return signing.verify_desired_state(signed, keys.signing_key().public_key())


def test_it_publishes_a_signed_desired_model_on_deployment(site_berlin: Site) -> None:
    node, _ = make_node(site_berlin, "gw-1")
    desired_state_publish(node=node, actor=ACTOR)
    before = _desired(node).generation
    version = valid_version(make_model("detector", classification=Clearance.INTERNAL),
                            preferred_providers=["CUDAExecutionProvider"], max_batch_size=4, max_queue_delay_ms=2.5)
    services.deployment_create(actor=ACTOR, version=version, sites=[site_berlin])
    state = _desired(node)
    assert state.generation == before + 1
    [model] = state.models
    assert (model.name, model.version, model.variant) == ("detector", version.version, "original")
    assert (model.sha256, model.size) == (version.sha256, version.size)
    assert model.providers == ["CUDAExecutionProvider"] and model.max_batch_size == 4
    assert model.max_queue_delay_ms == 2.5 and model.classification == Clearance.INTERNAL
    signing.verify_artifact(model.sha256, model.signature, keys.signing_key().public_key())
    deployment = Deployment.objects.get(version=version)
    assert AuditEvent.objects.filter(action="deployment.create", object_id=str(deployment.uuid)).exists()
    # Deploying the same version to the same site again changes nothing.
    services.deployment_create(actor=ACTOR, version=version, sites=[site_berlin])
    assert _desired(node).generation == before + 1 and Deployment.objects.count() == 1


def test_it_sends_the_int8_variant_to_small_devices_and_the_original_to_servers(site_berlin: Site) -> None:
    device, _ = make_node(site_berlin, "line-3", role="device", memory_mb=8192)
    small_gateway, _ = make_node(site_berlin, "gw-small", role="gateway", memory_mb=2048)
    server, _ = make_node(site_berlin, "srv-1", role="server", memory_mb=65536)
    version = valid_version(allow_quantized=True)
    int8 = version.variants.get(kind="int8")
    services.deployment_create(actor=ACTOR, version=version, sites=[site_berlin])
    for node in (device, small_gateway):
        [model] = _desired(node).models
        assert (model.variant, model.sha256, model.size) == ("int8", int8.sha256, int8.size)
        signing.verify_artifact(model.sha256, model.signature, keys.signing_key().public_key())
    [model] = _desired(server).models
    assert (model.variant, model.sha256) == ("original", version.sha256)


def test_it_sends_the_original_to_devices_when_quantization_is_not_allowed(site_berlin: Site) -> None:
    device, _ = make_node(site_berlin, "line-3", role="device", memory_mb=1024)
    version = valid_version(allow_quantized=False)
    services.deployment_create(actor=ACTOR, version=version, nodes=[device])
    [model] = desired_models_for_node(device)
    assert model.variant == "original" and model.sha256 == version.sha256


@pytest.mark.parametrize(
    ("requirements", "node_kwargs", "reason"),
    [
        ({"min_memory_mb": 8192}, {"memory_mb": 2048}, "needs 8192 MB of memory; the node reports 2048 MB"),
        ({"node_roles": ["server"]}, {"role": "device"}, "runs only on server nodes; this node is a device"),
        ({"required_providers": ["CUDAExecutionProvider"]}, {},
         "needs execution provider CUDAExecutionProvider, which the node does not report"),
    ],
    ids=["memory", "role", "provider"],
)
def test_it_reports_why_a_node_is_excluded(site_berlin: Site, requirements: dict[str, Any],
                                           node_kwargs: dict[str, Any], reason: str) -> None:
    excluded, _ = make_node(site_berlin, "small", **node_kwargs)
    fitting, _ = make_node(site_berlin, "big", role="server", memory_mb=65536,
                           providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    version = valid_version(**requirements)
    [deployment] = services.deployment_create(actor=ACTOR, version=version, sites=[site_berlin])
    placements = {p.node.name: p for p in deployment_placement(deployment)}
    assert placements["small"].variant is None and placements["small"].reason == reason
    assert placements["big"].variant == "original" and placements["big"].reason == ""
    assert desired_models_for_node(excluded) == []
    assert _desired(excluded).models == []
    assert [m.name for m in _desired(fitting).models] == [version.model.slug]


def test_it_keeps_a_model_above_the_sites_clearance_away(region_eu: Any) -> None:
    from tests.fixtures.personas import make_site

    public_site = make_site(region_eu, "kiosk", clearance=Clearance.PUBLIC)
    node, _ = make_node(public_site, "k-1")
    version = valid_version(make_model(classification=Clearance.SECRET))
    [deployment] = services.deployment_create(actor=ACTOR, version=version, sites=[public_site])
    [placement] = deployment_placement(deployment)
    assert "classified Secret, above the site's clearance Public" in placement.reason
    assert desired_models_for_node(node) == []


def test_it_lets_the_newest_version_of_a_model_win(site_berlin: Site) -> None:
    node, _ = make_node(site_berlin, "gw-1")
    model = make_model()
    old = valid_version(model)
    new = valid_version(model)
    services.deployment_create(actor=ACTOR, version=old, sites=[site_berlin])
    [new_deployment] = services.deployment_create(actor=ACTOR, version=new, nodes=[node])
    [desired] = desired_models_for_node(node)
    assert desired.version == new.version
    old_deployment = Deployment.objects.get(version=old)
    [placement] = deployment_placement(old_deployment)
    assert placement.reason == f"version {new.version} of this model is newer and wins"
    services.deployment_remove(actor=ACTOR, deployment=new_deployment)
    [desired] = _desired(node).models
    assert desired.version == old.version


def test_it_removes_a_deployment_and_republishes(site_berlin: Site) -> None:
    node, _ = make_node(site_berlin, "gw-1")
    version = valid_version()
    [deployment] = services.deployment_create(actor=ACTOR, version=version, sites=[site_berlin])
    generation = _desired(node).generation
    services.deployment_remove(actor=ACTOR, deployment=deployment)
    state = _desired(node)
    assert state.generation == generation + 1 and state.models == []
    assert AuditEvent.objects.filter(action="deployment.remove", object_id=str(deployment.uuid)).exists()
    with pytest.raises(services.RegistryError, match="already removed"):
        services.deployment_remove(actor=ACTOR, deployment=deployment)


def test_it_refuses_a_deployment_without_targets() -> None:
    with pytest.raises(services.RegistryError, match="choose at least one site or node"):
        services.deployment_create(actor=ACTOR, version=valid_version())


def _sync(client: Client, node: Node, credential: str, models: list[dict[str, Any]]) -> Any:
    body = {"actual": {"applied_generation": 1, "models": models}}
    return client.post(f"/agent/v1/nodes/{node.uuid}/sync", json.dumps(body), content_type="application/json",
                       headers={"Authorization": f"Bearer {credential}"})


def test_it_shows_where_a_version_runs_and_a_silent_cpu_fallback(client: Client, site_berlin: Site) -> None:
    node, credential = make_node(site_berlin, "gw-1", providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    quiet, _ = make_node(site_berlin, "gw-2")
    version = valid_version(preferred_providers=["CUDAExecutionProvider"])
    services.deployment_create(actor=ACTOR, version=version, sites=[site_berlin])
    status = {"name": version.model.slug, "version": version.version, "sha256": version.sha256,
              "provider": "CPUExecutionProvider", "state": "serving"}
    assert _sync(client, node, credential, [status]).status_code == 200
    rows = {row.node.name: row for row in model_placements(version)}
    assert rows["gw-1"].reported is not None and rows["gw-1"].reported["state"] == "serving"
    assert rows["gw-1"].cpu_fallback is True
    assert rows["gw-2"].reported is None and rows["gw-2"].placement.variant == "original"
    assert rows["gw-2"].cpu_fallback is False


def test_it_records_a_refusal_once(client: Client, site_berlin: Site) -> None:
    node, credential = make_node(site_berlin, "gw-1")
    refused = {"name": "detector", "version": "1.0", "sha256": "ab" * 32, "state": "refused",
               "error": "artifact signature does not match the pinned key"}
    for _ in range(3):
        assert _sync(client, node, credential, [refused]).status_code == 200
    events = AuditEvent.objects.filter(action="model.refused", object_id=str(node.uuid))
    assert events.count() == 1
    assert events.get().after["error"] == refused["error"]
    # A different error for the same artifact is a new record.
    assert _sync(client, node, credential, [{**refused, "error": "out of memory"}]).status_code == 200
    assert events.count() == 2
    serving = {"name": "detector", "version": "1.0", "state": "serving"}
    assert _sync(client, node, credential, [serving]).status_code == 200
    assert AuditEvent.objects.filter(action__startswith="model.", object_id=str(node.uuid)).count() == 2


def test_it_records_a_fallback_to_cpu_once_with_the_nodes_reasons(client: Client, site_berlin: Site) -> None:
    node, credential = make_node(site_berlin, "gw-1", providers=("OpenVINOExecutionProvider", "CPUExecutionProvider"))
    why = "OpenVINOExecutionProvider: changes the results on the range probe inputs: output 'c' differs: 14"
    fallen = {"name": "detector", "version": "1.0", "sha256": "cd" * 32, "state": "serving",
              "provider": "CPUExecutionProvider", "placement": "cpu_fallback", "cpu_nodes": 1, "graph_nodes": 1,
              "fallback": why}
    for _ in range(3):
        assert _sync(client, node, credential, [fallen]).status_code == 200
    events = AuditEvent.objects.filter(action="model.cpu_fallback", object_id=str(node.uuid))
    assert events.count() == 1
    assert events.get().after["error"] == why and events.get().after["provider"] == "CPUExecutionProvider"
    # Serving on the accelerator, or partly on it, is not a fallback to record.
    partial = {**fallen, "provider": "OpenVINOExecutionProvider", "placement": "partial", "fallback": ""}
    assert _sync(client, node, credential, [partial]).status_code == 200
    assert AuditEvent.objects.filter(action__startswith="model.", object_id=str(node.uuid)).count() == 1

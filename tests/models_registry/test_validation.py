"""Upload and validation: the state machine, its checks, and what bad input gets."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from edge_runtime import signing
from models_registry import services, storage
from models_registry.models import ModelVariant, ModelVersion, VersionStatus
from models_registry.selectors import desired_models_for_node
from orchestrator import keys
from sites.models import Site
from tests.fixtures.processes import wait_until
from tests.fixtures.workers import Worker
from tests.models_registry import onnx_factory
from tests.models_registry.helpers import ACTOR, make_model, make_node, upload, valid_version


def _statuses(version: ModelVersion) -> list[str]:
    return list(version.events.order_by("at", "pk").values_list("to_status", flat=True))


@pytest.mark.process
def test_it_validates_an_upload_through_a_real_worker(celery_worker_process: Worker) -> None:
    data = onnx_factory.linear()
    model = make_model("linear")
    version = upload(model, data, version="1.0.0", allow_quantized=True, preferred_providers=["CUDAExecutionProvider"])
    assert version.status == VersionStatus.UPLOADED

    def finished() -> ModelVersion | None:
        version.refresh_from_db()
        return version if version.status in (VersionStatus.VALID, VersionStatus.INVALID) else None

    wait_until(finished, timeout=120, interval=0.25, what=f"validation (worker log: {celery_worker_process.log})")
    assert version.status == VersionStatus.VALID, version.validation_log
    assert version.sha256 == hashlib.sha256(data).hexdigest() and version.size == len(data)
    assert storage.artifact_path(version.sha256).read_bytes() == data
    public = keys.signing_key().public_key()
    signing.verify_artifact(version.sha256, version.signature, public)
    assert version.signature_inputs == [{"name": "x", "datatype": "FP32", "shape": [-1, 32]}]
    assert version.signature_outputs == [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}]
    assert version.opset == onnx_factory.OPSET
    assert [step["step"] for step in version.validation_log][:3] == ["parse", "external data", "onnx checker"]
    variant = ModelVariant.objects.get(version=version, kind="int8")
    assert variant.sha256 != version.sha256
    assert variant.max_abs_diff is not None and 0 < variant.max_abs_diff < 0.05
    signing.verify_artifact(variant.sha256, variant.signature, public)
    assert storage.artifact_path(variant.sha256).stat().st_size == variant.size
    assert _statuses(version) == ["uploaded", "validating", "valid"]
    actions = set(AuditEvent.objects.filter(object_id=str(version.uuid)).values_list("action", flat=True))
    assert {"model_version.upload", "model_version.validating", "model_version.valid"} <= actions


BAD_INPUTS = [
    pytest.param(b"name,score\nalice,3\n", "parse", "not an ONNX model", id="not-onnx"),
    pytest.param(onnx_factory.truncated(), "parse", "truncated", id="truncated"),
    pytest.param(onnx_factory.inconsistent(), "onnx checker", "'ghost'", id="corrupt"),
    pytest.param(onnx_factory.external_data("../../etc/passwd"), "external data",
                 "tensor 'W' points its external data at '../../etc/passwd', which is outside", id="escaping-path"),
    pytest.param(onnx_factory.external_data("/etc/shadow"), "external data",
                 "tensor 'W' points its external data at '/etc/shadow'", id="absolute-path"),
    pytest.param(onnx_factory.external_data("weights.bin"), "external data", "self-contained", id="external-file"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("data", "step", "message"), BAD_INPUTS)
def test_it_refuses_bad_models_naming_what_is_wrong(site_berlin: Site, data: bytes, step: str, message: str) -> None:
    version = upload(make_model(), data, version="1.0")
    result = services.model_version_validate(version_id=version.pk)
    assert result is not None and result.status == VersionStatus.INVALID
    failed = result.validation_log[-1]
    assert failed["ok"] is False and failed["step"] == step and message in failed["detail"], failed
    assert not result.signature and not result.variants.exists()
    assert _statuses(result) == ["uploaded", "validating", "invalid"]
    assert message in result.events.last().message
    # Nothing deployable: the service refuses, and no node would receive it.
    node, _ = make_node(site_berlin, "gw-1")
    with pytest.raises(services.DeploymentRefused, match="is invalid; only valid versions can be deployed"):
        services.deployment_create(actor=ACTOR, version=result, sites=[site_berlin])
    assert desired_models_for_node(node) == []


@pytest.mark.django_db
def test_it_refuses_an_oversized_upload_storing_nothing(settings: Any, tmp_path: Path) -> None:
    settings.ARTIFACT_DIR = tmp_path / "artifacts"
    settings.MAX_MODEL_BYTES = 100
    model = make_model()
    with pytest.raises(services.ArtifactRefused, match="larger than the limit of 100 bytes") as caught:
        upload(model, onnx_factory.linear(), version="1.0")
    assert caught.value.field == "file"
    assert not ModelVersion.objects.exists()
    assert [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()] == []


@pytest.mark.django_db
def test_it_refuses_bad_requirements_before_storing(settings: Any, tmp_path: Path) -> None:
    settings.ARTIFACT_DIR = tmp_path / "artifacts"
    model = make_model()
    with pytest.raises(services.RegistryError, match="unknown role 'robot'"):
        upload(model, version="1.0", node_roles=["robot"])
    with pytest.raises(services.RegistryError, match="version: 1 to 50"):
        upload(model, version="../1")
    assert not ModelVersion.objects.exists() and not (tmp_path / "artifacts" / "sha256").exists()


@pytest.mark.django_db
def test_it_refuses_a_duplicate_version() -> None:
    model = make_model()
    upload(model, version="2.0")
    with pytest.raises(services.RegistryError, match="already has a version 2.0"):
        upload(model, version="2.0")
    assert ModelVersion.objects.filter(model=model).count() == 1


@pytest.mark.django_db
def test_it_stores_artifacts_by_content(settings: Any, tmp_path: Path) -> None:
    settings.ARTIFACT_DIR = tmp_path
    data = onnx_factory.relu()
    stored = storage.artifact_store(io.BytesIO(data))
    digest = hashlib.sha256(data).hexdigest()
    assert stored.path == tmp_path / "sha256" / digest[:2] / digest and stored.path.read_bytes() == data
    assert storage.artifact_store(io.BytesIO(data)).path == stored.path
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == []


@pytest.mark.django_db
def test_it_is_safe_to_validate_twice() -> None:
    version = upload(make_model(), version="1.0", allow_quantized=True)
    first = services.model_version_validate(version_id=version.pk)
    assert first is not None and first.status == VersionStatus.VALID
    events = first.events.count()
    audits = AuditEvent.objects.count()
    assert services.model_version_validate(version_id=version.pk) is None
    assert first.events.count() == events and AuditEvent.objects.count() == audits
    assert ModelVariant.objects.filter(version=version).count() == 1


@pytest.mark.django_db
def test_it_keeps_a_model_with_nothing_to_quantize_valid() -> None:
    version = upload(make_model(), onnx_factory.relu(), version="1.0", allow_quantized=True)
    result = services.model_version_validate(version_id=version.pk)
    assert result is not None and result.status == VersionStatus.VALID
    assert not result.variants.exists()
    assert "nothing to quantize" in result.validation_log[-1]["detail"]


@pytest.mark.django_db
def test_it_reads_integer_outputs_into_the_signature() -> None:
    version = upload(make_model(), onnx_factory.argmax_classifier(), version="1.0")
    result = services.model_version_validate(version_id=version.pk)
    assert result is not None and result.status == VersionStatus.VALID
    assert result.signature_outputs == [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]},
                                        {"name": "label", "datatype": "INT64", "shape": [-1]}]


@pytest.mark.django_db
def test_it_requeues_a_validation_whose_worker_was_lost(settings: Any) -> None:
    settings.MODEL_VALIDATION_TIMEOUT_S = 60
    version = upload(make_model(), version="1.0")
    stale = timezone.now() - dt.timedelta(minutes=5)
    ModelVersion.objects.filter(pk=version.pk).update(status=VersionStatus.VALIDATING, claimed_at=stale, attempts=1)
    assert services.model_version_reconcile() >= 1
    version.refresh_from_db()
    assert version.status == VersionStatus.UPLOADED
    assert "worker was lost" in version.events.last().message
    # The re-queued run claims and finishes it.
    result = services.model_version_validate(version_id=version.pk)
    assert result is not None and result.status == VersionStatus.VALID and result.attempts == 2


@pytest.mark.django_db
def test_it_gives_up_on_a_model_that_keeps_killing_workers(settings: Any) -> None:
    settings.MODEL_VALIDATION_TIMEOUT_S = 60
    version = upload(make_model(), version="1.0")
    stale = timezone.now() - dt.timedelta(minutes=5)
    ModelVersion.objects.filter(pk=version.pk).update(
        status=VersionStatus.VALIDATING, claimed_at=stale, attempts=services.MAX_VALIDATION_ATTEMPTS)
    services.model_version_reconcile()
    version.refresh_from_db()
    assert version.status == VersionStatus.INVALID
    assert "may crash onnxruntime" in version.validation_log[-1]["detail"]


@pytest.mark.django_db
def test_it_leaves_a_fresh_validation_alone(settings: Any) -> None:
    settings.MODEL_VALIDATION_TIMEOUT_S = 600
    version = upload(make_model(), version="1.0")
    ModelVersion.objects.filter(pk=version.pk).update(status=VersionStatus.VALIDATING, claimed_at=timezone.now())
    services.model_version_reconcile()
    version.refresh_from_db()
    assert version.status == VersionStatus.VALIDATING


@pytest.mark.django_db
@pytest.mark.parametrize(("settings_", "message"), [
    ({"preferred_providers": ["OpenVinoExecutionProvider"]},
     "preferred_providers: 'OpenVinoExecutionProvider' is not an execution provider onnxruntime knows "
     "(did you mean OpenVINOExecutionProvider?)"),
    ({"required_providers": ["cuda"]}, "required_providers: 'cuda' is not an execution provider onnxruntime knows"),
    ({"forbidden_providers": ["CPUExecutionProvider"]}, "CPUExecutionProvider cannot be forbidden"),
    ({"required_providers": ["CUDAExecutionProvider"], "forbidden_providers": ["CUDAExecutionProvider"]},
     "forbidden_providers: CUDAExecutionProvider is also required"),
    ({"provider_options": {"OpenVINO": {"device_type": "GPU"}}}, "provider_options: 'OpenVINO' is not"),
    ({"provider_options": {"OpenVINOExecutionProvider": {"device_type": ["GPU"]}}},
     "provider_options: OpenVINOExecutionProvider: device_type: must be a string, number or boolean"),
    ({"preferred_providers": ["AzureExecutionProvider"]}, "calls a remote endpoint"),
    ({"output_rtol": 2.0}, "output_rtol: must be between 0 and 1"),
])
def test_it_refuses_misspelled_or_unusable_provider_settings_naming_them(
        settings: Any, tmp_path: Path, settings_: dict[str, Any], message: str) -> None:
    settings.ARTIFACT_DIR = tmp_path / "artifacts"
    with pytest.raises(services.RegistryError) as caught:
        upload(make_model(), version="1.0", **settings_)
    assert message in caught.value.message
    assert not ModelVersion.objects.exists() and not (tmp_path / "artifacts" / "sha256").exists()


@pytest.mark.django_db
def test_provider_settings_reach_the_nodes_desired_model(site_berlin: Site) -> None:
    node, _ = make_node(site_berlin, "gw-1")
    version = valid_version(
        make_model("detector"), preferred_providers=["OpenVINOExecutionProvider"],
        forbidden_providers=["TensorrtExecutionProvider"],
        provider_options={"OpenVINOExecutionProvider": {"device_type": "GPU", "num_streams": 2}},
        output_rtol=1e-3, output_atol=0.01, finite_inputs=True)
    services.deployment_create(actor=ACTOR, version=version, sites=[site_berlin])
    (desired,) = desired_models_for_node(node)
    assert desired.providers == ["OpenVINOExecutionProvider"]
    assert desired.forbidden_providers == ["TensorrtExecutionProvider"]
    assert desired.provider_options == {"OpenVINOExecutionProvider": {"device_type": "GPU", "num_streams": "2"}}
    assert (desired.rtol, desired.atol, desired.finite_inputs) == (1e-3, 0.01, True)

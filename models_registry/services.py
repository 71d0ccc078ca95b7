"""Writes of the model registry. Each runs in one transaction with its audit event.

Validation is a state machine (``VersionStatus``): ``model_version_upload``
stores the artifact and leaves the version ``uploaded``; the Celery task
``models_registry.model_version_validate`` claims it with a conditional update
(``uploaded`` → ``validating``), runs the checks of ``models_registry.validation``
outside any transaction, and ends it ``valid`` or ``invalid``. Every transition
writes a ``ModelVersionEvent`` and an audit event. ``model_version_reconcile``
(periodic) re-queues versions whose worker was lost.
"""

from __future__ import annotations

import datetime as dt
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from celery import signature
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from audit.services import Actor, audit_record
from edge_runtime import signing
from edge_runtime.protocol.providers import ProviderNameError, check_forbidden, check_names, check_options
from models_registry import storage, validation
from models_registry.models import (
    VERSION_PATTERN,
    Deployment,
    Model,
    ModelVariant,
    ModelVersion,
    ModelVersionEvent,
    VersionStatus,
)
from orchestrator import keys
from orchestrator.desired_state import desired_state_publish_many
from sites.models import Clearance, Node, NodeRole, Site

# A worker that holds a version this long without finishing is presumed lost.
MAX_VALIDATION_ATTEMPTS = 3

# The validation task (models_registry.tasks.model_version_validate_task).
VALIDATE_TASK = "models_registry.model_version_validate"


class RegistryError(Exception):
    """A refused request; ``status`` is the HTTP status a view answers with."""

    status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class ArtifactRefused(RegistryError):
    status = 413


class DeploymentRefused(RegistryError):
    status = 409


def _user_id(actor: Actor) -> int | None:
    from django.contrib.auth import get_user_model

    if actor.type != "user":
        return None
    return get_user_model().objects.filter(username=actor.label).values_list("pk", flat=True).first()


def _first_error(exc: ValidationError) -> tuple[str, str | None]:
    if hasattr(exc, "error_dict"):
        field, errors = next(iter(exc.error_dict.items()))
        return f"{field}: {' '.join(m for e in errors for m in e.messages)}", field
    return " ".join(exc.messages), None


def _save_valid(model: Model) -> None:
    """Save ``model`` once Django's validation passes; its first error is the :class:`RegistryError`."""
    try:
        model.full_clean()
    except ValidationError as exc:
        message, field = _first_error(exc)
        raise RegistryError(message, field=field) from exc
    model.save()


def model_create(*, actor: Actor, slug: str, name: str, description: str = "",
                 classification: int = Clearance.INTERNAL) -> Model:
    with transaction.atomic():
        model = Model(slug=slug, name=name, description=description, classification=classification,
                      created_by_id=_user_id(actor))
        _save_valid(model)
        audit_record(actor=actor, action="model.create", obj=model,
                     after={"slug": slug, "name": name, "classification": classification})
    return model


def _providers(values: Iterable[str], field: str, *, forbidden: bool = False) -> list[str]:
    """Provider names as onnxruntime spells them; a misspelling is refused naming it (and the closest name)."""
    cleaned = [v.strip() for v in values if v and v.strip()]
    try:
        return check_forbidden(cleaned) if forbidden else check_names(cleaned, field)
    except ProviderNameError as exc:
        raise RegistryError(str(exc), field=field) from None


def _provider_settings(*, required: list[str], forbidden: Iterable[str], options: Mapping[str, Any] | None,
                       rtol: float, atol: float, finite_inputs: bool) -> dict[str, Any]:
    barred = _providers(forbidden, "forbidden_providers", forbidden=True)
    both = [p for p in required if p in barred]
    if both:
        raise RegistryError(f"forbidden_providers: {both[0]} is also required", field="forbidden_providers")
    try:
        checked = check_options(options)
    except ProviderNameError as exc:
        raise RegistryError(str(exc), field="provider_options") from None
    if not (isinstance(rtol, int | float) and 0 <= rtol <= 1):
        raise RegistryError("output_rtol: must be between 0 and 1", field="output_rtol")
    if not (isinstance(atol, int | float) and 0 <= atol <= 1e6):
        raise RegistryError("output_atol: must be between 0 and 1000000", field="output_atol")
    return {"forbidden_providers": barred, "provider_options": checked, "output_rtol": float(rtol),
            "output_atol": float(atol), "finite_inputs": bool(finite_inputs)}


def _requirements(*, min_memory_mb: int, node_roles: Iterable[str], required_providers: Iterable[str],
                  preferred_providers: Iterable[str], allow_quantized: bool, max_batch_size: int,
                  max_queue_delay_ms: float, forbidden_providers: Iterable[str] = (),
                  provider_options: Mapping[str, Any] | None = None, output_rtol: float = 1e-4,
                  output_atol: float = 1e-5, finite_inputs: bool = False) -> dict[str, Any]:
    roles = list(dict.fromkeys(node_roles))
    unknown = [r for r in roles if r not in NodeRole.values]
    if unknown:
        raise RegistryError(f"node_roles: unknown role {unknown[0]!r}; roles are {', '.join(NodeRole.values)}",
                            field="node_roles")
    if not 0 <= min_memory_mb <= 16 * 1024 * 1024:
        raise RegistryError("min_memory_mb: must be between 0 and 16777216", field="min_memory_mb")
    if not 1 <= max_batch_size <= 1024:
        raise RegistryError("max_batch_size: must be between 1 and 1024", field="max_batch_size")
    if not 0 <= max_queue_delay_ms <= 1000:
        raise RegistryError("max_queue_delay_ms: must be between 0 and 1000", field="max_queue_delay_ms")
    required = _providers(required_providers, "required_providers")
    return {
        "min_memory_mb": int(min_memory_mb),
        "node_roles": roles,
        "required_providers": required,
        "preferred_providers": _providers(preferred_providers, "preferred_providers"),
        "allow_quantized": bool(allow_quantized),
        "max_batch_size": int(max_batch_size),
        "max_queue_delay_ms": float(max_queue_delay_ms),
        **_provider_settings(required=required, forbidden=forbidden_providers, options=provider_options,
                             rtol=output_rtol, atol=output_atol, finite_inputs=finite_inputs),
    }


def _event(version: ModelVersion, *, to: str, before: str, message: str, actor: Actor) -> None:
    """Record one transition (already applied to ``version``): timeline row and audit event."""
    ModelVersionEvent.objects.create(version=version, from_status=before, to_status=to, message=message[:4000])
    audit_record(actor=actor, action=f"model_version.{to}", obj=version, object_repr=str(version),
                 before={"status": before} if before else None, after={"status": to, "message": message[:1000]})


def _enqueue_validation(version_id: int) -> None:
    # By the task's stable name (models_registry.tasks defines it): the tasks module imports this one.
    transaction.on_commit(lambda: signature(VALIDATE_TASK, args=(version_id,)).apply_async())


def _artifact_unused(sha256: str) -> bool:
    return not (ModelVersion.objects.filter(sha256=sha256).exists()
                or ModelVariant.objects.filter(sha256=sha256).exists())


def model_version_upload(*, actor: Actor, model: Model, version: str, file: BinaryIO | Iterable[bytes],
                         min_memory_mb: int = 0, node_roles: Sequence[str] = (),
                         required_providers: Sequence[str] = (), preferred_providers: Sequence[str] = (),
                         allow_quantized: bool = False, max_batch_size: int = 8,
                         max_queue_delay_ms: float = 0.0, forbidden_providers: Sequence[str] = (),
                         provider_options: Mapping[str, Any] | None = None, output_rtol: float = 1e-4,
                         output_atol: float = 1e-5, finite_inputs: bool = False) -> ModelVersion:
    """Store the artifact and create the version (``uploaded``); validation is queued on commit.

    Everything that can be checked without the file is checked before a byte
    is stored; a file over ``MAX_MODEL_BYTES`` is refused with nothing kept.
    """
    if not re.match(VERSION_PATTERN, version or ""):
        raise RegistryError("version: 1 to 50 letters, digits, '.', '_', '+' or '-', starting with a letter or "
                            "digit", field="version")
    requirements = _requirements(
        min_memory_mb=min_memory_mb, node_roles=node_roles, required_providers=required_providers,
        preferred_providers=preferred_providers, allow_quantized=allow_quantized, max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms, forbidden_providers=forbidden_providers,
        provider_options=provider_options, output_rtol=output_rtol, output_atol=output_atol,
        finite_inputs=finite_inputs,
    )
    if ModelVersion.objects.filter(model=model, version=version).exists():
        raise RegistryError(f"version: model {model.slug} already has a version {version}", field="version")
    try:
        stored = storage.artifact_store(file)
    except storage.ArtifactTooLarge as exc:
        raise ArtifactRefused(f"file: {exc}", field="file") from exc
    try:
        with transaction.atomic():
            row = ModelVersion.objects.create(model=model, version=version, sha256=stored.sha256, size=stored.size,
                                              created_by_id=_user_id(actor), **requirements)
            _event(row, to=VersionStatus.UPLOADED, before="", actor=actor,
                   message=f"uploaded {stored.size} bytes, sha256 {stored.sha256}")
            audit_record(actor=actor, action="model_version.upload", obj=row, object_repr=str(row),
                         after={"sha256": stored.sha256, "size": stored.size, **requirements})
            _enqueue_validation(row.pk)
    except IntegrityError as exc:
        if _artifact_unused(stored.sha256):
            stored.path.unlink(missing_ok=True)
        raise RegistryError(f"version: model {model.slug} already has a version {version}", field="version") from exc
    return row


def model_version_validate(*, version_id: int) -> ModelVersion | None:
    """Claim and validate one version. Safe to run twice: a second run finds nothing to claim.

    The checks run outside any transaction (they take seconds); the result is
    written only if this run still holds the claim, so a run the reconciler
    gave up on cannot overwrite the run that replaced it.
    """
    actor = Actor.system("validation")
    claimed_at = timezone.now()
    with transaction.atomic():
        claimed = ModelVersion.objects.filter(pk=version_id, status=VersionStatus.UPLOADED).update(
            status=VersionStatus.VALIDATING, claimed_at=claimed_at, attempts=F("attempts") + 1)
        if not claimed:
            return None
        version = ModelVersion.objects.select_related("model").get(pk=version_id)
        _event(version, to=VersionStatus.VALIDATING, before=VersionStatus.UPLOADED, actor=actor,
               message=f"validation started (attempt {version.attempts})")
    path = storage.artifact_path(version.sha256)
    with tempfile.TemporaryDirectory(prefix="edgewise-validate-") as workdir:
        result = _run_checks(path, version.allow_quantized, Path(workdir))
        variant: tuple[storage.StoredArtifact, float] | None = None
        if result.ok and result.variant is not None:
            variant = (storage.artifact_store_path(result.variant.path), result.variant.max_abs_diff)
    key = keys.signing_key()
    with transaction.atomic():
        version = ModelVersion.objects.select_for_update().select_related("model").get(pk=version_id)
        if version.status != VersionStatus.VALIDATING or version.claimed_at != claimed_at:
            return version
        version.validation_log = result.log
        version.opset = result.opset
        version.signature_inputs = result.inputs
        version.signature_outputs = result.outputs
        if result.ok:
            version.signature = signing.sign_artifact(version.sha256, key)
            version.status = VersionStatus.VALID
            message = "every check passed; artifact signed"
            if variant is not None:
                stored, diff = variant
                ModelVariant.objects.update_or_create(
                    version=version, kind="int8",
                    defaults={"sha256": stored.sha256, "size": stored.size, "max_abs_diff": diff,
                              "signature": signing.sign_artifact(stored.sha256, key)})
                message += f"; int8 variant made (max |Δ| {diff:.6g})"
        else:
            version.status = VersionStatus.INVALID
            message = result.error
        version.save()
        _event(version, to=version.status, before=VersionStatus.VALIDATING, actor=actor, message=message)
    return version


def _run_checks(path: Path, allow_quantized: bool, workdir: Path) -> validation.ValidationResult:
    if not path.exists():
        return validation.ValidationResult(ok=False, log=[{
            "step": "artifact", "ok": False, "detail": f"the stored artifact is missing from {path.parent}"}])
    try:
        return validation.validate_artifact(path, allow_quantized=allow_quantized, workdir=workdir)
    except Exception as exc:  # noqa: BLE001 - a bug in a check must end the version, not loop it
        return validation.ValidationResult(ok=False, log=[{
            "step": "validation", "ok": False, "detail": f"unexpected error: {type(exc).__name__}: {exc}"}])


def model_version_reconcile(*, now: dt.datetime | None = None) -> int:
    """Re-queue versions left ``uploaded`` and recover those stuck ``validating``.

    A version held longer than ``MODEL_VALIDATION_TIMEOUT_S`` lost its worker:
    it goes back to ``uploaded`` and is queued again, or ``invalid`` after
    ``MAX_VALIDATION_ATTEMPTS`` (a model that kills every worker that loads it).
    Safe to run twice. Returns how many versions were queued or ended.
    """
    now = now or timezone.now()
    actor = Actor.system("validation-reconciler")
    cut = now - dt.timedelta(seconds=settings.MODEL_VALIDATION_TIMEOUT_S)
    touched = 0
    for version_id in ModelVersion.objects.filter(status=VersionStatus.VALIDATING, claimed_at__lt=cut).values_list(
            "pk", flat=True):
        with transaction.atomic():
            version = ModelVersion.objects.select_for_update().select_related("model").get(pk=version_id)
            if version.status != VersionStatus.VALIDATING or version.claimed_at is None or version.claimed_at >= cut:
                continue
            lost = f"validation did not finish within {settings.MODEL_VALIDATION_TIMEOUT_S:g}s (its worker was lost)"
            if version.attempts >= MAX_VALIDATION_ATTEMPTS:
                version.status = VersionStatus.INVALID
                version.validation_log = [*version.validation_log, {
                    "step": "validation", "ok": False,
                    "detail": f"{lost} in {version.attempts} attempts; the model may crash onnxruntime"}]
                message = f"{lost} in {version.attempts} attempts; given up"
            else:
                version.status = VersionStatus.UPLOADED
                message = f"{lost}; queued again"
                _enqueue_validation(version.pk)
            version.save(update_fields=["status", "validation_log"])
            _event(version, to=version.status, before=VersionStatus.VALIDATING, actor=actor, message=message)
            touched += 1
    for version_id in ModelVersion.objects.filter(status=VersionStatus.UPLOADED).values_list("pk", flat=True):
        # Its task may have been lost with the broker; a duplicate finds nothing to claim.
        with transaction.atomic():
            _enqueue_validation(version_id)
        touched += 1
    return touched


def _affected_nodes(deployments: Iterable[Deployment]) -> list[Node]:
    nodes: dict[int, Node] = {}
    for deployment in deployments:
        if deployment.node is not None:
            nodes[deployment.node.pk] = deployment.node
        else:
            for node in deployment.target_site.nodes.filter(revoked_at__isnull=True).select_related("site"):
                nodes[node.pk] = node
    return [n for n in nodes.values() if n.revoked_at is None]


def _deployment_fields(deployment: Deployment) -> dict[str, Any]:
    return {"model": deployment.version.model.slug, "version": deployment.version.version,
            "target": deployment.target_label}


def deployment_create(*, actor: Actor, version: ModelVersion, sites: Sequence[Site] = (),
                      nodes: Sequence[Node] = ()) -> list[Deployment]:
    """Assign a valid version to sites and nodes, then publish the affected nodes' desired states.

    The caller has checked that the actor may operate every target site.
    Assigning a version to a target it is already deployed to changes nothing.
    """
    if not sites and not nodes:
        raise RegistryError("choose at least one site or node to deploy to", field="targets")
    with transaction.atomic():
        version = ModelVersion.objects.select_for_update().select_related("model").get(pk=version.pk)
        if version.status != VersionStatus.VALID:
            raise DeploymentRefused(
                f"version {version.version} of model {version.model.slug} is {version.get_status_display().lower()}; "
                "only valid versions can be deployed")
        for node in nodes:
            if node.revoked_at is not None:
                raise DeploymentRefused(f"node {node} is revoked", field="nodes")
        active = Deployment.objects.filter(version=version, removed_at__isnull=True)
        deployments: list[Deployment] = []
        targets: list[dict[str, Any]] = [{"site": s} for s in sites] + [{"node": n} for n in nodes]
        for target in targets:
            existing = active.filter(**target).first()
            if existing is not None:
                deployments.append(existing)
                continue
            deployment = Deployment.objects.create(version=version, created_by_id=_user_id(actor), **target)
            audit_record(actor=actor, action="deployment.create", obj=deployment, object_repr=str(deployment),
                         site_uuid=deployment.target_site.uuid, after=_deployment_fields(deployment))
            deployments.append(deployment)
        desired_state_publish_many(nodes=list(_affected_nodes(deployments)), actor=actor)
    return deployments


def deployment_remove(*, actor: Actor, deployment: Deployment) -> Deployment:
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update(of=("self",)).select_related(
            "version__model", "site", "node__site").get(pk=deployment.pk)
        if deployment.removed_at is not None:
            raise RegistryError("this deployment is already removed")
        deployment.removed_at = timezone.now()
        deployment.save(update_fields=["removed_at"])
        audit_record(actor=actor, action="deployment.remove", obj=deployment, object_repr=str(deployment),
                     site_uuid=deployment.target_site.uuid, before=_deployment_fields(deployment))
        desired_state_publish_many(nodes=list(_affected_nodes([deployment])), actor=actor)
    return deployment


def version_outcome_record(*, version: ModelVersion, rolled_back: bool, note: str = "") -> None:
    """Mark ``version`` rolled back (a rollout of it failed or was aborted) or clear the mark (one succeeded)."""
    at = timezone.now() if rolled_back else None
    ModelVersion.objects.filter(pk=version.pk).update(rolled_back_at=at, rolled_back_note=note[:300])
    version.rolled_back_at, version.rolled_back_note = at, note[:300]


MODEL_UPDATABLE = ("name", "description", "classification")


def model_update(*, actor: Actor, model: Model, **fields: Any) -> Model:
    """Change a model's name, description or data classification, audited.

    The slug is not among them: nodes serve a model under it. A new
    classification changes where the model may run, so every active node's
    desired state is recomputed (a no-op for the nodes it does not move); the
    placement policy then withdraws it from sites whose clearance is too low.
    """
    unknown = sorted(set(fields) - set(MODEL_UPDATABLE))
    if unknown:
        raise RegistryError(f"{unknown[0]}: a model's {unknown[0]} cannot be changed", field=unknown[0])
    with transaction.atomic():
        model = Model.objects.select_for_update().get(pk=model.pk)
        before = {name: getattr(model, name) for name in MODEL_UPDATABLE}
        for name, value in fields.items():
            setattr(model, name, value)
        _save_valid(model)
        after = {name: getattr(model, name) for name in MODEL_UPDATABLE}
        if after != before:
            changed = [name for name in MODEL_UPDATABLE if after[name] != before[name]]
            audit_record(actor=actor, action="model.update", obj=model,
                         before={k: before[k] for k in changed}, after={k: after[k] for k in changed})
            if "classification" in changed:
                nodes = Node.objects.filter(revoked_at__isnull=True).select_related("site")
                desired_state_publish_many(nodes=list(nodes), actor=actor)
    return model

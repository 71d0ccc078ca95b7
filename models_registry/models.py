"""Models, their versions (ONNX artifacts), hardware variants and deployments.

A version's artifact is content-addressed by sha256 (see ``models_registry.storage``)
and signed by the control plane once validation passed. Validation is a state
machine stored here (``ModelVersion.status``) with one ``ModelVersionEvent`` per
transition, so a killed worker leaves a state that the reconciler picks up.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

from core.permissions import RestrictedQuerySet, Scope
from edge_runtime import protocol
from sites.models import Clearance, Node, Site

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,49}$"


class Model(models.Model):
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # The name nodes serve it under (the Open Inference Protocol's model name).
    slug = models.CharField(
        max_length=100,
        unique=True,
        validators=[RegexValidator(protocol.MODEL_NAME_PATTERN,
                                   "lower-case letters, digits, '.', '_' and '-', starting with a letter or digit")],
    )
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    # The classification of the data the model was trained on / reveals:
    # compared with a site's clearance at placement.
    classification = models.PositiveSmallIntegerField(choices=Clearance.choices, default=Clearance.INTERNAL)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class VersionStatus(models.TextChoices):
    UPLOADED = "uploaded", "Uploaded"  # artifact stored; waiting for a worker to claim validation
    VALIDATING = "validating", "Validating"  # claimed by a worker (claimed_at); the reconciler re-queues it if stuck
    VALID = "valid", "Valid"  # every check passed and the artifact is signed: deployable
    INVALID = "invalid", "Invalid"  # a check failed (validation_log says which); never deployable


class ModelVersion(models.Model):
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model = models.ForeignKey(Model, on_delete=models.PROTECT, related_name="versions")
    version = models.CharField(max_length=50, validators=[RegexValidator(VERSION_PATTERN)])
    sha256 = models.CharField(max_length=64, db_index=True)
    size = models.PositiveBigIntegerField()
    # Ed25519 over signing.artifact_message(sha256), base64; empty until valid.
    signature = models.CharField(max_length=200, blank=True)
    status = models.CharField(max_length=12, choices=VersionStatus.choices, default=VersionStatus.UPLOADED)
    # [{"step": "...", "ok": bool, "detail": "..."}] in the order the checks ran.
    validation_log = models.JSONField(default=list, blank=True)
    opset = models.PositiveIntegerField(null=True, blank=True)
    # [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]: -1 marks a dynamic dimension.
    signature_inputs = models.JSONField(default=list, blank=True)
    signature_outputs = models.JSONField(default=list, blank=True)
    # Requirements a node must meet to be given this version.
    min_memory_mb = models.PositiveIntegerField(default=0)
    node_roles = models.JSONField(default=list, blank=True)  # empty: any role
    required_providers = models.JSONField(default=list, blank=True)
    preferred_providers = models.JSONField(default=list, blank=True)
    # Providers the version must never run on (not CPU), and options per provider
    # ({"OpenVINOExecutionProvider": {"device_type": "GPU", "precision": "FP16"}}).
    forbidden_providers = models.JSONField(default=list, blank=True)
    provider_options = models.JSONField(default=dict, blank=True)
    # How far an accelerator's outputs may be from CPU's on the node's probe inputs (past it, CPU serves),
    # and whether the inputs are always finite (the probes then send no NaN or infinity).
    output_rtol = models.FloatField(default=1e-4, validators=[MinValueValidator(0), MaxValueValidator(1)])
    output_atol = models.FloatField(default=1e-5, validators=[MinValueValidator(0), MaxValueValidator(1e6)])
    finite_inputs = models.BooleanField(default=False)
    allow_quantized = models.BooleanField(default=False)
    max_batch_size = models.PositiveIntegerField(default=8, validators=[MinValueValidator(1), MaxValueValidator(1024)])
    max_queue_delay_ms = models.FloatField(default=0.0, validators=[MinValueValidator(0), MaxValueValidator(1000)])
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    # When a worker claimed validation; with ``attempts`` it lets the reconciler
    # tell a slow validation from a lost one, and give up on a model that kills workers.
    claimed_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    # Set when a rollout of this version failed or was aborted (its nodes were put back), cleared when one
    # succeeds: version pickers mark it and never choose it by default.
    rolled_back_at = models.DateTimeField(null=True, blank=True)
    rolled_back_note = models.CharField(max_length=300, blank=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    class Meta:
        ordering = ["model", "-created_at"]
        constraints = [models.UniqueConstraint(fields=["model", "version"], name="model_version_unique")]

    def __str__(self) -> str:
        return f"{self.model.slug}@{self.version}" if self.model_id else self.version

    @property
    def deployable(self) -> bool:
        return self.status == VersionStatus.VALID


class ModelVersionEvent(models.Model):
    """One transition of a version's validation: the console's timeline."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="events")
    from_status = models.CharField(max_length=12, choices=VersionStatus.choices, blank=True)
    to_status = models.CharField(max_length=12, choices=VersionStatus.choices)
    message = models.TextField(blank=True)
    at = models.DateTimeField(auto_now_add=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    class Meta:
        ordering = ["at", "pk"]

    def __str__(self) -> str:
        return f"{self.version}: {self.from_status or '∅'} → {self.to_status}"


class ModelVariant(models.Model):
    """A hardware variant of a version (an int8 build for small devices)."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="variants")
    kind = models.CharField(max_length=20)
    sha256 = models.CharField(max_length=64, db_index=True)
    size = models.PositiveBigIntegerField()
    signature = models.CharField(max_length=200)
    # Largest absolute difference of its outputs from the original's on the smoke inputs.
    max_abs_diff = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    class Meta:
        ordering = ["kind"]
        constraints = [models.UniqueConstraint(fields=["version", "kind"], name="model_variant_unique_kind")]

    def __str__(self) -> str:
        return f"{self.version} [{self.kind}]"


class Deployment(models.Model):
    """A direct assignment of a version to one site (all its nodes) or one node."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="deployments")
    site = models.ForeignKey(Site, null=True, blank=True, on_delete=models.CASCADE, related_name="deployments")
    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.CASCADE, related_name="deployments")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    # Set when removed; the row stays as history.
    removed_at = models.DateTimeField(null=True, blank=True, db_index=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("site", "node__site")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=(models.Q(site__isnull=False, node__isnull=True)
                           | models.Q(site__isnull=True, node__isnull=False)),
                name="deployment_targets_a_site_or_a_node",
            )
        ]

    def __str__(self) -> str:
        return f"{self.version} → {self.target_label}"

    @property
    def target_label(self) -> str:
        return f"site {self.site.slug}" if self.site is not None else f"node {self.node}"

    @property
    def target_site(self) -> Site:
        if self.site is not None:
            return self.site
        assert self.node is not None  # the check constraint: a site or a node, exactly one
        return self.node.site


class NodeModelReport(models.Model):
    """A refusal or failure a node reported for one artifact, recorded once per error."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="model_reports")
    # The artifact's sha256, or "name@version/variant" when the node did not say.
    artifact = models.CharField(max_length=200)
    error_digest = models.CharField(max_length=64)
    name = models.CharField(max_length=100)
    version = models.CharField(max_length=50)
    variant = models.CharField(max_length=20)
    state = models.CharField(max_length=12)
    error = models.TextField(blank=True)
    first_reported_at = models.DateTimeField(auto_now_add=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("node__site")

    class Meta:
        ordering = ["-first_reported_at"]
        constraints = [
            models.UniqueConstraint(fields=["node", "artifact", "error_digest"], name="node_model_report_once")
        ]

    def __str__(self) -> str:
        return f"{self.node}: {self.name}@{self.version} {self.state}"

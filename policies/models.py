"""Versioned policies and approval decisions.

A :class:`Policy` is one kind of policy for the whole estate (``placement``,
``rollout``, ``data``); its rules select the regions and sites they concern. Every
edit writes a new immutable :class:`PolicyVersion` (the document as
validated, its sha256 and who wrote it); the newest version is in force.
Nothing is ever edited in place, so any past decision can be traced to the
exact rules that made it.

An :class:`Approval` is one person's decision on one subject (a rollout) as
planned at that moment: it binds to the subject's ``plan_hash`` and expires
at ``expires_at``. A changed plan has another hash, so approvals of the old
plan no longer count; nothing needs to delete them, and they stay as history.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from core.permissions import RestrictedQuerySet, Scope


class PolicyKind(models.TextChoices):
    PLACEMENT = "placement", "Placement"  # which classification may run where; evaluated by planner and nodes
    ROLLOUT = "rollout", "Rollout"  # approvals required, default waves and gates
    DATA = "data", "Data"  # which datasets, columns and aggregates may leave each site (federated queries)


class Policy(models.Model):
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    kind = models.CharField(max_length=20, choices=PolicyKind.choices, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    class Meta:
        ordering = ["kind"]
        verbose_name_plural = "policies"

    def __str__(self) -> str:
        return f"{self.get_kind_display()} policy"


class PolicyVersion(models.Model):
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    policy = models.ForeignKey(Policy, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    # The document exactly as validated (defaults filled in).
    document = models.JSONField()
    sha256 = models.CharField(max_length=64)
    comment = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    class Meta:
        ordering = ["policy", "-number"]
        constraints = [models.UniqueConstraint(fields=["policy", "number"], name="policy_version_unique_number")]

    def __str__(self) -> str:
        return f"{self.policy} v{self.number}"


class Decision(models.TextChoices):
    APPROVE = "approve", "Approve"
    REJECT = "reject", "Reject"


class Approval(models.Model):
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # What was decided on: "rollout" and the rollout's uuid (kept generic so
    # policy changes can be approved the same way).
    subject_type = models.CharField(max_length=30)
    subject_uuid = models.UUIDField(db_index=True)
    plan_hash = models.CharField(max_length=64)
    decision = models.CharField(max_length=10, choices=Decision.choices)
    # The role the decision was made under (the rule's), for the record.
    role = models.CharField(max_length=20)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    comment = models.CharField(max_length=500, blank=True)
    decided_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    class Meta:
        ordering = ["-decided_at"]
        constraints = [
            models.UniqueConstraint(fields=["subject_type", "subject_uuid", "plan_hash", "user"],
                                    name="approval_once_per_user_and_plan"),
        ]

    def __str__(self) -> str:
        return f"{self.decision} {self.subject_type} {self.subject_uuid} by {self.user_id}"


class LoginFailure(models.Model):
    """A failed console login, kept while it counts towards throttling (``policies.auth``)."""

    username = models.CharField(max_length=150)
    ip = models.GenericIPAddressField(null=True, blank=True)
    at = models.DateTimeField(db_index=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    class Meta:
        indexes = [models.Index(fields=["username", "at"]), models.Index(fields=["ip", "at"])]

    def __str__(self) -> str:
        return f"failed login for {self.username!r} from {self.ip or 'unknown'} at {self.at:%Y-%m-%d %H:%M:%S}"

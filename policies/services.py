"""Writes of policies and approvals. Each runs in one transaction with its audit event.

``policy_update`` validates a document with the one evaluator's own models
(:mod:`edge_runtime.policy`), so what the console accepts is exactly what
planners and nodes can evaluate; a bad rule is refused with an error naming
it, and nothing is written. A new placement policy changes every node's
signed policy bundle, so each active node's desired state is published again
in the same transaction (a no-op for nodes whose bundle came out the same).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from audit.services import Actor, audit_record
from edge_runtime.policy.data import DataPolicyDocument
from edge_runtime.policy.placement import PlacementPolicy, PolicyDocument, PolicyInvalid, parse_document
from edge_runtime.policy.rollout import RolloutPolicy
from orchestrator.desired_state import desired_state_publish_many
from policies.models import Approval, Decision, Policy, PolicyKind, PolicyVersion
from sites.models import Node

DOCUMENTS: dict[str, type[PolicyDocument]] = {
    PolicyKind.PLACEMENT: PlacementPolicy,
    PolicyKind.ROLLOUT: RolloutPolicy,
    PolicyKind.DATA: DataPolicyDocument,
}


class PoliciesError(Exception):
    """A refused request; ``status`` is the HTTP status a view answers with."""

    status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def policy_validate(*, kind: str, document: Any) -> PolicyDocument:
    """The validated document, or PoliciesError naming the offending rule."""
    model = DOCUMENTS.get(kind)
    if model is None:
        raise PoliciesError(f"unknown policy kind {kind!r}; kinds are {', '.join(DOCUMENTS)}", field="kind")
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except ValueError as exc:
            raise PoliciesError(f"document: not valid JSON ({exc})", field="document") from exc
    if isinstance(document, dict) and document.get("kind", kind) != kind:
        raise PoliciesError(f"document: kind is {document.get('kind')!r}, but this is the {kind} policy",
                            field="document")
    try:
        return parse_document(model, document)
    except PolicyInvalid as exc:
        raise PoliciesError(f"document: {exc}", field="document") from exc


def _user_id(actor: Actor) -> int | None:
    if actor.type != "user":
        return None
    return get_user_model().objects.filter(username=actor.label).values_list("pk", flat=True).first()


def policy_update(*, actor: Actor, kind: str, document: Any, comment: str = "") -> PolicyVersion:
    """Write a new version of the ``kind`` policy; refused if invalid or identical to the current one."""
    validated = policy_validate(kind=kind, document=document)
    data = validated.model_dump(mode="json")
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    with transaction.atomic():
        policy, _ = Policy.objects.get_or_create(kind=kind)
        policy = Policy.objects.select_for_update().get(pk=policy.pk)
        current = policy.versions.order_by("-number").first()
        if current is not None and current.sha256 == digest:
            raise PoliciesError(f"document: identical to version {current.number}; nothing to save",
                                field="document")
        version = PolicyVersion.objects.create(
            policy=policy, number=(current.number if current else 0) + 1, document=data, sha256=digest,
            comment=comment[:500], created_by_id=_user_id(actor))
        audit_record(actor=actor, action=f"policy.{kind}.update", obj=version, object_repr=str(version),
                     before={"version": current.number, "document": current.document} if current else None,
                     after={"version": version.number, "document": data, "sha256": digest, "comment": comment})
        if kind in (PolicyKind.PLACEMENT, PolicyKind.DATA):
            # Both are part of every node's signed policy bundle.
            _republish_bundles(actor)
    return version


def _republish_bundles(actor: Actor) -> None:
    desired_state_publish_many(nodes=list(Node.objects.filter(revoked_at__isnull=True)
                                          .select_related("site__region")), actor=actor)


def approval_record(*, actor: Actor, user: Any, subject_type: str, subject_uuid: Any, plan_hash: str,
                    decision: str, role: str, ttl: dt.timedelta, comment: str = "",
                    site_uuid: Any = None) -> Approval:
    """Record one person's decision on one plan; who may decide is the caller's to check.

    Runs in the caller's transaction when there is one (the subject's state
    changes with it). One decision per person and plan.
    """
    if decision not in Decision.values:
        raise PoliciesError(f"decision must be one of {', '.join(Decision.values)}", field="decision")
    with transaction.atomic():
        if Approval.objects.filter(subject_type=subject_type, subject_uuid=subject_uuid, plan_hash=plan_hash,
                                   user=user).exists():
            raise PoliciesError("you have already decided on this plan")
        approval = Approval.objects.create(
            subject_type=subject_type, subject_uuid=subject_uuid, plan_hash=plan_hash, decision=decision,
            role=role, user=user, comment=comment[:500], expires_at=timezone.now() + ttl)
        audit_record(actor=actor, action=f"{subject_type}.{decision}", obj=approval,
                     object_repr=f"{subject_type} {subject_uuid}", site_uuid=site_uuid,
                     after={"subject": str(subject_uuid), "plan_hash": plan_hash, "decision": decision,
                            "role": role, "expires_at": approval.expires_at.isoformat(), "comment": comment})
    return approval

"""What nodes report they could not serve, or serve on CPU instead of their accelerator: audited once each."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from django.db import transaction

from audit.services import Actor, audit_record
from edge_runtime import protocol
from models_registry.models import NodeModelReport
from sites.models import Node


def _digest(state: str, error: str) -> str:
    # A refusal's or failure's digest is of its error alone, as recorded before fallbacks were.
    return hashlib.sha256((error if state in ("refused", "failed") else f"{state}:{error}").encode()).hexdigest()


def model_status_report(*, node: Node, statuses: Iterable[protocol.ModelStatus], actor: Actor | None = None) -> int:
    """Audit what a node refused or failed to serve, or serves on CPU instead of its accelerator.

    Once per (node, artifact, error): a node repeating the same error on every
    sync leaves one record. A fallback to CPU is recorded with the node's
    reasons (state ``cpu_fallback``, action ``model.cpu_fallback``). Returns
    how many new reports were recorded.
    """
    troubled = [s for s in statuses if s.state == "refused" or (s.state == "failed" and s.error)
                or (s.state == "serving" and s.placement == "cpu_fallback" and s.fallback)]
    if not troubled:
        return 0  # the common case: nothing to record, no transaction opened
    actor = actor or Actor.node(node)
    recorded = 0
    with transaction.atomic():
        for status in troubled:
            artifact = status.sha256 or f"{status.name}@{status.version}/{status.variant}"
            state, error = (status.placement, status.fallback) if status.state == "serving" else (status.state,
                                                                                                    status.error)
            _, created = NodeModelReport.objects.get_or_create(
                node=node, artifact=artifact, error_digest=_digest(state, error),
                defaults={"name": status.name, "version": status.version, "variant": status.variant,
                          "state": state, "error": error},
            )
            if created:
                audit_record(actor=actor, action=f"model.{state}", obj=node, site_uuid=node.site.uuid,
                             after={"model": status.name, "version": status.version, "variant": status.variant,
                                    "sha256": status.sha256, "error": error, "provider": status.provider})
                recorded += 1
    return recorded

"""The dataset catalog: each node's reported datasets, written only when its report changed."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.utils import timezone
from pydantic import ValidationError

from audit.services import Actor, audit_record
from edge_runtime.data.catalog import DatasetSchema as WireSchema
from queries.models import DatasetSchema
from sites.models import Node

logger = logging.getLogger(__name__)

# The catalog's name column (queries.models.DatasetSchema).
MAX_DATASET_NAME = 64


def dataset_catalog_report(*, node: Node, report: Any, actor: Actor) -> bool:
    """Keep ``node``'s catalog rows in line with the ``datasets`` part of its sync report.

    Called by ``node_sync`` before it stores the new actual state, so
    ``node.actual_state`` still holds the last report: an unchanged report
    costs nothing. Entries that are not valid schemas are skipped (logged).
    A dataset appearing, disappearing, changing its columns or becoming
    unreadable is audited; a changed row count is not (files grow all day).
    Returns whether it wrote an audit event.
    """
    previous = ((node.actual_state or {}).get("detail") or {}).get("datasets")
    if report == previous:
        return False
    schemas, errors = _report_parse(node, report)
    with transaction.atomic():
        before, after = _catalog_write(node, schemas, errors)
        if before == after:
            return False
        audit_record(actor=actor, action="node.datasets", obj=node, site_uuid=node.site.uuid,
                     before={"datasets": before}, after={"datasets": after})
    return True


def _report_parse(node: Node, report: Any) -> tuple[dict[str, WireSchema], dict[str, str]]:
    """The valid schemas of ``report`` by name, and the errors it reports for datasets without one."""
    schemas: dict[str, WireSchema] = {}
    errors: dict[str, str] = {}
    if not isinstance(report, dict):
        return schemas, errors
    # The sync's wire model has checked these shapes (edge_runtime.protocol.DatasetsReport); a caller
    # passing anything else gets an empty catalog rather than an exception.
    entries = report.get("datasets")
    reported_errors = report.get("errors")
    for entry in entries if isinstance(entries, list) else []:
        try:
            schema = WireSchema.model_validate(entry)
        except ValidationError as exc:
            logger.warning("node %s reported a dataset schema that is not valid: %s", node.uuid,
                           exc.errors()[0]["msg"])
            continue
        if len(schema.name) > MAX_DATASET_NAME:
            logger.warning("node %s reported a dataset name longer than %d characters", node.uuid,
                           MAX_DATASET_NAME)
            continue
        schemas[schema.name] = schema
    for name, message in (reported_errors if isinstance(reported_errors, dict) else {}).items():
        if isinstance(name, str) and name not in schemas:
            errors[name[:64]] = str(message)[:500]
    return schemas, errors


def _catalog_write(node: Node, schemas: dict[str, WireSchema],
                   errors: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replace ``node``'s catalog rows (in the caller's transaction); the audited shapes before and after."""
    now = timezone.now()
    existing = {row.name: row for row in DatasetSchema.objects.filter(node=node)}
    before = {name: _shape(row.schema, row.error) for name, row in existing.items()}
    after: dict[str, Any] = {}
    for name in sorted({*schemas, *errors}):
        schema = schemas.get(name)
        fields: dict[str, Any] = {
            "kind": schema.kind if schema else "",
            "schema": schema.model_dump(mode="json") if schema else {},
            "row_count": schema.row_count if schema else 0,
            "error": "" if schema else errors[name],
            "reported_at": now,
        }
        DatasetSchema.objects.update_or_create(node=node, name=name, defaults=fields)
        after[name] = _shape(fields["schema"], fields["error"])
    DatasetSchema.objects.filter(node=node).exclude(name__in=list(after)).delete()
    return before, after


def _shape(schema: dict[str, Any], error: str) -> Any:
    """What is audited of a dataset: its columns and types, or its error (not its row count)."""
    if error:
        return {"error": error}
    return {"kind": schema.get("kind"), "columns": {c["name"]: c["type"] for c in schema.get("columns") or []}}

"""A site's answer, stored once, and the merged result of a query once every site is final."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.db import transaction
from django.utils import timezone

from audit.services import Actor, audit_record
from edge_runtime.data.engine import spec_digest
from edge_runtime.data.merge import MergedResult, merge_results
from edge_runtime.data.wire import QueryResult
from queries.models import FederatedQuery, QueryEvent, QuerySite, QueryState, SiteState
from queries.services import QueriesError, QueryNotFound
from sites.models import Node

logger = logging.getLogger(__name__)


def query_result_record(*, node: Node, query_id: str, result: QueryResult, actor: Actor) -> tuple[QuerySite, bool]:
    """Store ``node``'s answer to ``query_id``; (the site's row, False) when it was already final.

    The answer is stored once: a repeat, or an answer after the site timed
    out, changes nothing (the node is told all is well, so it stops
    retrying). QueryNotFound if the query is not this node's to answer.
    """
    try:
        query_uuid = uuid.UUID(query_id)
    except ValueError:
        raise QueryNotFound("no such query for this node") from None
    found = QuerySite.objects.filter(query__uuid=query_uuid, node=node).values_list("pk", "query_id").first()
    if found is None:
        raise QueryNotFound("no such query for this node")
    if result.status == "answered":
        _check_mergeable(FederatedQuery.objects.values_list("spec", flat=True).get(pk=found[1]), result)
    with transaction.atomic():
        query = FederatedQuery.objects.select_for_update().get(pk=found[1])
        row = QuerySite.objects.select_for_update().select_related("site").get(pk=found[0])
        if row.is_final:
            return row, False
        previous = row.state
        status = _answer_store(row, query, result)
        detail = {"status": status, "reason": row.reason, "rule": row.rule, "field": row.field,
                  "suppressed_cells": row.suppressed_cells, "suppressed_rows": row.suppressed_rows,
                  "rows_scanned": row.rows_scanned, "elapsed_ms": row.elapsed_ms,
                  "node_audit_seq": row.node_audit_seq}
        QueryEvent.objects.create(query=query, site=row.site, from_state=previous, to_state=row.state, detail=detail)
        audit_record(actor=actor, action=f"query.site_{row.state}", obj=query, object_repr=str(query),
                     site_uuid=row.site.uuid, after={"query": str(query.uuid), "site": row.site.slug,
                                                     "node": str(node.uuid), **detail})
        query_finish_if_final(query)
    return row, True


def _answer_store(row: QuerySite, query: FederatedQuery, result: QueryResult) -> str:
    """Write ``result`` into the site's ``row`` (locked by the caller); the status it was stored as."""
    status = result.status
    reason = result.reason
    if status == "answered" and result.spec_digest != spec_digest(query.spec):
        # An answer to some other document: merging it would be wrong, whatever it holds.
        status, reason = "error", "the answer is for a different query document (spec digest differs)"
    row.state = {"answered": SiteState.ANSWERED, "refused": SiteState.REFUSED}.get(status, SiteState.ERROR)
    row.reason = reason[:1000]
    row.rule = (result.rule or "")[:40]
    row.field = (result.field or "")[:100]
    row.result_json = result.model_copy(update={"site": row.site.slug}).model_dump_json() \
        if row.state == SiteState.ANSWERED else ""
    row.suppressed_cells = result.suppressed.cells
    row.suppressed_rows = result.suppressed.rows
    row.rows_scanned = result.rows_scanned
    row.elapsed_ms = result.elapsed_ms
    row.node_audit_seq = result.audit_seq
    row.answered_at = timezone.now()
    row.save()
    return status


# What merging values of the wrong kind raises (pandas and numpy included): a node's answer, not a bug here.
MERGE_FAILURES = (ArithmeticError, LookupError, TypeError, ValueError)


def _check_mergeable(spec: dict[str, Any], result: QueryResult) -> None:
    """QueriesError (400) if ``result`` cannot be merged on its own: values that do not fit their declared types,
    counts past int64, ... A node's answer that would break the merge of every site is refused when it arrives."""
    try:
        merge_results(spec, [result])
    except MERGE_FAILURES as exc:
        where = "rows" if result.rows is not None and result.partials is None else "partials"
        raise QueriesError(f"{where}: the answer cannot be merged: {type(exc).__name__}: {str(exc)[:300]}",
                           field=where) from None


def _merge_tolerant(spec: dict[str, Any], results: list[QueryResult], *, query_id: str) -> MergedResult:
    """merge_results, leaving out (as errors) the answers that cannot be merged with the ones before them.

    Each answer merged on its own when it arrived; answers that do not fit one another (the same key typed
    differently by two sites) are only found here. The common case costs one merge.
    """
    try:
        return merge_results(spec, results, query_id=query_id)
    except MERGE_FAILURES:
        logger.warning("query %s: the sites' answers do not merge together; leaving out those that do not fit",
                       query_id, exc_info=True)
    kept: list[QueryResult] = []
    for result in results:
        try:
            merge_results(spec, [*kept, result], query_id=query_id)
        except MERGE_FAILURES as exc:
            result = result.model_copy(update={
                "status": "error", "partials": None, "rows": None,
                "reason": f"its answer cannot be merged with the other sites': {type(exc).__name__}"[:1000]})
        kept.append(result)
    return merge_results(spec, kept, query_id=query_id)


def query_finish_if_final(query: FederatedQuery) -> None:
    """Merge and close ``query`` if every site is final (the caller holds its lock)."""
    if query.is_final:
        return
    rows = list(QuerySite.objects.filter(query=query).select_related("site").order_by("site__slug"))
    if any(not row.is_final for row in rows):
        return
    results: list[QueryResult] = []
    for row in rows:
        if row.state == SiteState.ANSWERED:
            results.append(QueryResult.model_validate_json(row.result_json))
        else:
            # Not answered: it still appears in the merged result's account of the sites, with its reason.
            results.append(QueryResult(query_id=str(query.uuid), site=row.site.slug,
                                       status="refused" if row.state == SiteState.REFUSED else "error",
                                       reason=(row.reason or row.get_state_display())[:1000],
                                       rule=row.rule or None, field=row.field or None))
    merged = _merge_tolerant(query.spec, results, query_id=str(query.uuid))
    answered = sum(1 for s in merged.sites if s.status == "answered")
    previous = query.state
    query.state = (QueryState.COMPLETE if answered == len(rows) else
                   QueryState.PARTIAL if answered else QueryState.FAILED)
    query.result_json = merged.model_dump_json()
    query.finished_at = timezone.now()
    query.save(update_fields=["state", "result_json", "finished_at"])
    counts = {state: sum(1 for r in rows if r.state == state) for state in SiteState.values}
    detail = {"answered": answered, "sites": len(rows), "rows": len(merged.rows), "complete": merged.complete,
              "suppressed_cells": merged.suppressed_cells,
              **{k: v for k, v in counts.items() if v and k != SiteState.ANSWERED}}
    QueryEvent.objects.create(query=query, from_state=previous, to_state=query.state, detail=detail)
    audit_record(actor=Actor.system("query-merge"), action="query.finish", obj=query, object_repr=str(query),
                 before={"state": previous}, after={"query": str(query.uuid), "state": query.state, **detail})

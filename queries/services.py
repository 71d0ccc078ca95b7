"""Writes of federated queries. Each runs in one transaction with its audit events.

A query's life, as a state machine stored in the database (see
:mod:`queries.models` for the states):

1. :func:`query_create` validates the document (structure, then every target
   site's catalog: an unknown dataset or column, a wrong type or an injection
   attempt is refused naming the field, and nothing is written), checks that
   the person may **query** every target site, picks the node that answers at
   each site, and nudges those nodes to sync at once.
2. Each node's sync answer carries the queries waiting for it
   (:func:`query_deliveries`, called by ``sites.services.node_sync``) until
   its answer arrives; the node runs each query once.
3. :func:`query_result_record` stores a node's answer once (a repeat is
   acknowledged and ignored), audited per site.
4. :func:`query_expire` (Celery beat) marks sites that did not answer by
   their deadline ``timed_out``.
5. When every site is final the answers are merged exactly
   (:func:`edge_runtime.data.merge.merge_results`) and the query ends
   ``complete``, ``partial`` or ``failed``.

The catalog is kept by :func:`dataset_catalog_report`, also called by
``node_sync``: it writes only when a node's report changed.

Lock order, everywhere: the query row, then its sites' rows; so delivery,
answers and expiry of one query never deadlock. Delivery takes the query row
only for its first transition (a conditional update), so the syncs of many
nodes nudged at once do not queue on it.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from django.db import transaction
from django.utils import timezone
from pydantic import ValidationError

from audit.services import Actor, audit_record
from edge_runtime.data.binding import bind
from edge_runtime.data.catalog import DatasetSchema as WireSchema
from edge_runtime.data.engine import spec_digest
from edge_runtime.data.merge import MergedResult, merge_results
from edge_runtime.data.spec import MAX_SPEC_BYTES, SpecError, parse_spec
from edge_runtime.data.wire import QueryResult
from edge_runtime.protocol import QueryRequest
from edge_runtime.signing import canonical_json
from orchestrator.realtime import broadcast, node_group
from policies.permissions import user_can
from queries.models import (
    OPEN_SITE_STATES,
    DatasetSchema,
    FederatedQuery,
    OfflineBehaviour,
    QueryEvent,
    QuerySite,
    QueryState,
    SiteState,
)
from sites.liveness import node_status
from sites.models import Node, NodeStatus, Site

logger = logging.getLogger(__name__)

MAX_SITES = 500
MIN_DEADLINE_S = 1
MAX_DEADLINE_S = 7 * 86_400
# The catalog's name column (queries.models.DatasetSchema).
MAX_DATASET_NAME = 64
# Where several nodes of a site report the dataset, the biggest role answers (the site's own data lives there).
ROLE_PREFERENCE = {"server": 0, "gateway": 1, "device": 2}


class QueriesError(Exception):
    """A refused request; ``status`` is the HTTP status a view answers with, ``field`` what is wrong."""

    status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class QueryForbidden(QueriesError):
    status = 403


class QueryNotFound(QueriesError):
    status = 404


# -- the catalog --------------------------------------------------------------------------------------------------


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
    schemas: dict[str, WireSchema] = {}
    errors: dict[str, str] = {}
    if isinstance(report, dict):
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
    now = timezone.now()
    with transaction.atomic():
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
        if before == after:
            return False
        audit_record(actor=actor, action="node.datasets", obj=node, site_uuid=node.site.uuid,
                     before={"datasets": before}, after={"datasets": after})
    return True


def _shape(schema: dict[str, Any], error: str) -> Any:
    """What is audited of a dataset: its columns and types, or its error (not its row count)."""
    if error:
        return {"error": error}
    return {"kind": schema.get("kind"), "columns": {c["name"]: c["type"] for c in schema.get("columns") or []}}


# -- creating a query ---------------------------------------------------------------------------------------------


def _answering_nodes(sites: Sequence[Site], dataset: str) -> dict[int, DatasetSchema]:
    """Per site id, the catalog row of the node that answers there (see ROLE_PREFERENCE)."""
    rows = (DatasetSchema.objects.filter(node__site__in=[s.pk for s in sites], node__revoked_at__isnull=True,
                                         name=dataset, error="")
            .select_related("node").order_by("-reported_at"))
    chosen: dict[int, DatasetSchema] = {}
    for row in rows:
        site_id = row.node.site_id
        current = chosen.get(site_id)
        if current is None or ROLE_PREFERENCE.get(row.node.role, 9) < ROLE_PREFERENCE.get(current.node.role, 9):
            chosen[site_id] = row
    return chosen


def query_validate(*, spec: Any, sites: Sequence[Site]) -> tuple[dict[str, Any], dict[int, DatasetSchema]]:
    """The validated document and the answering node's catalog row per site; QueriesError naming the field."""
    if not isinstance(spec, dict):
        raise QueriesError("spec: a query is a JSON object", field="spec")
    if len(canonical_json(spec)) > MAX_SPEC_BYTES:
        raise QueriesError(f"spec: the query document is larger than {MAX_SPEC_BYTES // 1024} KiB", field="spec")
    try:
        parsed = parse_spec(spec)
    except SpecError as exc:
        raise QueriesError(str(exc), field=exc.field) from None
    if not sites:
        raise QueriesError("sites: choose at least one site", field="sites")
    if len(sites) > MAX_SITES:
        raise QueriesError(f"sites: at most {MAX_SITES} sites per query", field="sites")
    chosen = _answering_nodes(sites, parsed.dataset)
    if not chosen:
        known = sorted(set(DatasetSchema.objects.filter(node__site__in=[s.pk for s in sites],
                                                        node__revoked_at__isnull=True, error="")
                           .values_list("name", flat=True)))
        raise QueriesError(f"dataset: unknown dataset {parsed.dataset!r} at the chosen sites (datasets there: "
                           f"{', '.join(known) or 'none'})", field="dataset")
    for site in sites:
        row = chosen.get(site.pk)
        if row is None:
            raise QueriesError(f"sites: no node of site {site.slug!r} reports dataset {parsed.dataset!r}",
                               field="sites")
        try:
            bind(parsed, WireSchema.model_validate(row.schema))
        except SpecError as exc:
            where = f" (at site {site.slug!r})" if len(sites) > 1 else ""
            raise QueriesError(f"{exc.field}: {exc.message}{where}", field=exc.field) from None
    return parsed.model_dump(mode="json"), chosen


def query_create(*, actor: Actor, user: Any, spec: Any, sites: Sequence[Site],
                 offline_behaviour: str = OfflineBehaviour.WAIT, deadline_s: float = 60.0,
                 wait_s: float = 86_400.0) -> FederatedQuery:
    """Create a query of ``sites`` for ``user`` and wake the nodes that answer it.

    Refused, with nothing written, if ``user`` may not query one of the
    sites (QueryForbidden) or the document does not fit (QueriesError naming
    the field). ``deadline_s``: how long sites have to answer; under
    ``wait``, a site whose node is offline now has ``wait_s`` instead.
    """
    if offline_behaviour not in OfflineBehaviour.values:
        raise QueriesError(f"offline_behaviour: {offline_behaviour!r} is not one of "
                           f"{', '.join(OfflineBehaviour.values)}", field="offline_behaviour")
    for name, value in (("deadline_s", deadline_s), ("wait_s", wait_s)):
        if not MIN_DEADLINE_S <= value <= MAX_DEADLINE_S:
            raise QueriesError(f"{name}: must be between {MIN_DEADLINE_S} and {MAX_DEADLINE_S} seconds",
                               field=name)
    sites = list(dict.fromkeys(sites))
    for site in sites:
        if not user_can(user, "query", site):
            raise QueryForbidden(f"sites: you may not query site {site.slug!r}", field="sites")
    document, chosen = query_validate(spec=spec, sites=sites)
    now = timezone.now()
    deadline = now + dt.timedelta(seconds=deadline_s)
    wait_until = now + dt.timedelta(seconds=max(deadline_s, wait_s))
    with transaction.atomic():
        query = FederatedQuery.objects.create(
            spec=document, dataset=document["dataset"], created_by=user if user.is_authenticated else None,
            offline_behaviour=offline_behaviour, deadline=deadline, wait_until=wait_until)
        QueryEvent.objects.create(query=query, to_state=QueryState.PENDING,
                                  detail={"sites": [s.slug for s in sites]})
        targets = []
        for site in sites:
            node = chosen[site.pk].node
            online = node_status(last_seen_at=node.last_seen_at, revoked=False, now=now) == NodeStatus.ONLINE
            state = SiteState.PENDING if online else SiteState.OFFLINE
            site_deadline = deadline if online or offline_behaviour == OfflineBehaviour.TIMEOUT else wait_until
            QuerySite.objects.create(query=query, site=site, node=node, state=state, deadline=site_deadline)
            QueryEvent.objects.create(query=query, site=site, to_state=state,
                                      detail={"node": str(node.uuid), "deadline": site_deadline.isoformat()})
            targets.append({"site": site.slug, "node": str(node.uuid), "state": state})
            if online:
                # Wakes the node's sync at once (over its stream); polling would find the query too.
                broadcast(node_group(node.uuid), "node.nudge", {"generation": 0})
        audit_record(actor=actor, action="query.create", obj=query, object_repr=str(query),
                     after={"dataset": query.dataset, "spec": document, "sites": targets,
                            "offline_behaviour": offline_behaviour, "deadline": deadline.isoformat(),
                            "wait_until": wait_until.isoformat()})
    return query


# -- delivering and answering -------------------------------------------------------------------------------------


def query_deliveries(*, node: Node) -> list[QueryRequest]:
    """The queries waiting for ``node``'s answer, for its sync answer; marks the new ones ``sent``.

    Runs in the sync's transaction. A query is offered on every sync until
    the answer arrives (the node runs each id once), so an answer lost on the
    way is asked for again. Costs one indexed read when nothing waits.
    """
    now = timezone.now()
    rows = list(QuerySite.objects.filter(node=node, state__in=OPEN_SITE_STATES, deadline__gt=now)
                .select_related("query", "site").order_by("pk")[:100])
    if not rows:
        return []  # the common case: no savepoint, nothing else to do
    requests: list[QueryRequest] = []
    with transaction.atomic():
        for row in rows:
            if row.state != SiteState.SENT:
                # Conditional updates, not a lock of the query row: fifty nodes nudged at once must not queue
                # behind each other on one row. Only the first delivery touches the query (before its site row,
                # the lock order of answers and expiry).
                if row.query.state == QueryState.PENDING and FederatedQuery.objects.filter(
                        pk=row.query_id, state=QueryState.PENDING).update(state=QueryState.RUNNING):
                    QueryEvent.objects.create(query=row.query, from_state=QueryState.PENDING,
                                              to_state=QueryState.RUNNING)
                if QuerySite.objects.filter(pk=row.pk, state=row.state).update(state=SiteState.SENT, sent_at=now):
                    QueryEvent.objects.create(query=row.query, site=row.site, from_state=row.state,
                                              to_state=SiteState.SENT)
            requests.append(QueryRequest(query_id=str(row.query.uuid), spec=row.query.spec, deadline=row.deadline))
    return requests


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
        now = timezone.now()
        previous = row.state
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
        row.answered_at = now
        row.save()
        detail = {"status": status, "reason": row.reason, "rule": row.rule, "field": row.field,
                  "suppressed_cells": row.suppressed_cells, "suppressed_rows": row.suppressed_rows,
                  "rows_scanned": row.rows_scanned, "elapsed_ms": row.elapsed_ms,
                  "node_audit_seq": row.node_audit_seq}
        QueryEvent.objects.create(query=query, site=row.site, from_state=previous, to_state=row.state, detail=detail)
        audit_record(actor=actor, action=f"query.site_{row.state}", obj=query, object_repr=str(query),
                     site_uuid=row.site.uuid, after={"query": str(query.uuid), "site": row.site.slug,
                                                     "node": str(node.uuid), **detail})
        _finish_if_final(query)
    return row, True


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


def query_expire(*, now: dt.datetime | None = None) -> int:
    """Mark sites that did not answer by their deadline ``timed_out``; finish queries that are then final.

    Safe to run twice, and beside deliveries and answers: each query is
    re-read under its lock, and only sites still open past their deadline
    change. Returns how many sites timed out.
    """
    now = now or timezone.now()
    expired = 0
    query_ids = (QuerySite.objects.filter(state__in=OPEN_SITE_STATES, deadline__lte=now)
                 .values_list("query_id", flat=True).distinct())
    for query_id in list(query_ids):
        with transaction.atomic():
            query = FederatedQuery.objects.select_for_update().get(pk=query_id)
            rows = (QuerySite.objects.select_for_update(of=("self",)).select_related("site", "node")
                    .filter(query=query, state__in=OPEN_SITE_STATES, deadline__lte=now))
            for row in rows:
                previous = row.state
                why = {SiteState.OFFLINE: "its node was offline and did not come back",
                       SiteState.PENDING: "its node did not sync",
                       SiteState.SENT: "its node received the query but did not answer"}.get(previous, "")
                row.state = SiteState.TIMED_OUT
                row.reason = f"no answer by the deadline {row.deadline.isoformat(timespec='seconds')}: {why}"
                row.answered_at = now
                row.save(update_fields=["state", "reason", "answered_at"])
                QueryEvent.objects.create(query=query, site=row.site, from_state=previous, to_state=row.state,
                                          detail={"reason": row.reason})
                audit_record(actor=Actor.system("query-expiry"), action="query.site_timed_out", obj=query,
                             object_repr=str(query), site_uuid=row.site.uuid,
                             after={"query": str(query.uuid), "site": row.site.slug, "reason": row.reason})
                expired += 1
            _finish_if_final(query)
    return expired


def _finish_if_final(query: FederatedQuery) -> None:
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

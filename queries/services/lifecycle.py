"""A query from its creation to its deadline: validated and created, offered to its nodes, timed out.

A query is offered on every sync of its nodes until each answers; expiry is
safe to run twice and beside deliveries and answers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from django.db import transaction
from django.utils import timezone

from audit.services import Actor, audit_record
from core.permissions import user_can
from edge_runtime.data.binding import bind
from edge_runtime.data.catalog import DatasetSchema as WireSchema
from edge_runtime.data.spec import MAX_SPEC_BYTES, SpecError, parse_spec
from edge_runtime.protocol import Nudge, QueryRequest
from edge_runtime.signing import canonical_json
from orchestrator import quiet
from orchestrator.realtime import nudge_nodes
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
from queries.services import QueriesError, QueryForbidden
from queries.services.results import query_finish_if_final
from sites.liveness import node_status
from sites.models import Connectivity, Node, NodeStatus, Site

MAX_SITES = 500
MIN_DEADLINE_S = 1
MAX_DEADLINE_S = 7 * 86_400
# How long a site off the network may take: an air-gapped site answers when its bundle out comes back.
MAX_WAIT_S = 90 * 86_400
# Where several nodes of a site report the dataset, the biggest role answers (the site's own data lives there).
ROLE_PREFERENCE = {"server": 0, "gateway": 1, "device": 2}


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


def _wake(nudges: dict[str, Nudge]) -> None:
    """Wake these nodes' syncs at once (over their streams), after commit; polling would find the query too."""
    nudge_nodes(nudges)
    quiet.attention(nudges)


def query_create(*, actor: Actor, user: Any, spec: Any, sites: Sequence[Site],
                 offline_behaviour: str = OfflineBehaviour.WAIT, deadline_s: float = 60.0,
                 wait_s: float = 86_400.0) -> FederatedQuery:
    """Create a query of ``sites`` for ``user`` and wake the nodes that answer it.

    Refused, with nothing written, if ``user`` may not query one of the
    sites (QueryForbidden) or the document does not fit (QueriesError naming
    the field). ``deadline_s``: how long sites have to answer; under
    ``wait``, a site whose node is offline now, or that is air-gapped, has
    ``wait_s`` instead (up to 90 days: a bundle's round trip).
    """
    if offline_behaviour not in OfflineBehaviour.values:
        raise QueriesError(f"offline_behaviour: {offline_behaviour!r} is not one of "
                           f"{', '.join(OfflineBehaviour.values)}", field="offline_behaviour")
    _check_times(deadline_s=deadline_s, wait_s=wait_s)
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
        nudges: dict[str, Nudge] = {}
        for site in sites:
            node = chosen[site.pk].node
            online = node_status(last_seen_at=node.last_seen_at, revoked=False, now=now) == NodeStatus.ONLINE
            state = _first_state(site, online)
            # An air-gapped site is never "online" for a query: its answer comes back by bundle.
            near = online and state != SiteState.BUNDLE
            site_deadline = deadline if near or offline_behaviour == OfflineBehaviour.TIMEOUT else wait_until
            QuerySite.objects.create(query=query, site=site, node=node, state=state, deadline=site_deadline)
            QueryEvent.objects.create(query=query, site=site, to_state=state,
                                      detail={"node": str(node.uuid), "deadline": site_deadline.isoformat()})
            targets.append({"site": site.slug, "node": str(node.uuid), "state": state})
            if state == SiteState.PENDING:
                nudges[str(node.uuid)] = Nudge()
        _wake(nudges)
        audit_record(actor=actor, action="query.create", obj=query, object_repr=str(query),
                     after={"dataset": query.dataset, "spec": document, "sites": targets,
                            "offline_behaviour": offline_behaviour, "deadline": deadline.isoformat(),
                            "wait_until": wait_until.isoformat()})
    return query


def _check_times(*, deadline_s: float, wait_s: float) -> None:
    for name, value, most in (("deadline_s", deadline_s, MAX_DEADLINE_S), ("wait_s", wait_s, MAX_WAIT_S)):
        if not MIN_DEADLINE_S <= value <= most:
            raise QueriesError(f"{name}: must be between {MIN_DEADLINE_S} and {most} seconds", field=name)


def _first_state(site: Site, online: bool) -> SiteState:
    """An air-gapped site waits for a bundle (also if its node is heard from by some other path)."""
    if site.connectivity == Connectivity.AIR_GAPPED:
        return SiteState.BUNDLE
    return SiteState.PENDING if online else SiteState.OFFLINE


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
                _mark_running(row)
            if row.state not in (SiteState.SENT, SiteState.BUNDLE):
                if QuerySite.objects.filter(pk=row.pk, state=row.state).update(state=SiteState.SENT, sent_at=now):
                    QueryEvent.objects.create(query=row.query, site=row.site, from_state=row.state,
                                              to_state=SiteState.SENT)
            elif row.state == SiteState.BUNDLE and row.sent_at is None:
                # Carried in a bundle in: it stays waiting for the bundle out that answers it.
                QuerySite.objects.filter(pk=row.pk).update(sent_at=now)
            requests.append(QueryRequest(query_id=str(row.query.uuid), spec=row.query.spec, deadline=row.deadline))
    return requests


def _mark_running(row: QuerySite) -> None:
    """The query is running once a first site has it (before its site row: the lock order of answers and expiry).

    Conditional updates, not a lock of the query row: fifty nodes nudged at once must not queue behind each
    other on one row.
    """
    if row.query.state == QueryState.PENDING and FederatedQuery.objects.filter(
            pk=row.query_id, state=QueryState.PENDING).update(state=QueryState.RUNNING):
        QueryEvent.objects.create(query=row.query, from_state=QueryState.PENDING, to_state=QueryState.RUNNING)


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
                why = {SiteState.OFFLINE.value: "its node was offline and did not come back",
                       SiteState.PENDING.value: "its node did not sync",
                       SiteState.SENT.value: "its node received the query but did not answer",
                       SiteState.BUNDLE.value: "no bundle out of its air-gapped site brought the answer back"
                       }.get(previous, "")
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
            query_finish_if_final(query)
    return expired

"""The federated query console: the list of one's queries, the query form, a query's live page and its CSV.

Permissions: running a query needs the ``query`` right (Operator or Admin,
estate-wide or per region or site) on every target site: a site the person
may not see answers 404, one they may see but not query 403, and nothing is
created. A query is visible to the person who made it and to estate-wide
administrators (404 for anyone else). The query page polls its live panel
(``query-live``) every 2 seconds until the query is final.
"""

from __future__ import annotations

import csv
import json
import math
import uuid
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods

from audit.services import Actor
from core.htmx import render_page
from core.permissions import user_can
from queries import selectors
from queries.charts import chart_for
from queries.forms import AGGREGATE_SLOTS, FILTER_SLOTS, QueryForm
from queries.models import FederatedQuery, SiteState
from queries.services import QueriesError, QueryForbidden, lifecycle
from sites.models import Site

TABLE_ROWS = 1000
STATE_CLASS = {
    SiteState.PENDING: "status-pending", SiteState.SENT: "status-pending", SiteState.OFFLINE: "status-offline",
    SiteState.BUNDLE: "status-pending",
    SiteState.ANSWERED: "status-online", SiteState.REFUSED: "status-warning", SiteState.TIMED_OUT: "status-stale",
    SiteState.ERROR: "status-invalid", "complete": "status-online", "partial": "status-warning",
    "failed": "status-invalid", "running": "status-pending", "pending": "status-pending",
}


def _query_for(request: HttpRequest, query_id: uuid.UUID) -> FederatedQuery:
    query = selectors.query_get(user=request.user, query_uuid=query_id)
    if query is None:
        raise Http404("no such query")
    return query


@login_required
@require_GET
def query_list(request: HttpRequest) -> HttpResponse:
    queries = list(selectors.query_list(user=request.user).annotate(site_count=Count("sites"))[:200])
    for query in queries:
        query.badge = STATE_CLASS.get(query.state, "")  # type: ignore[attr-defined]
    can_query = selectors.may_query_somewhere(request.user)
    if not can_query and not queries:
        raise PermissionDenied("running federated queries needs the Operator role on a site")
    return render(request, "queries/query_list.html", {"queries": queries, "can_query": can_query})


def _target_sites(request: HttpRequest) -> list[Site]:
    """The posted sites: 404 for one the person may not see, 403 for one they may see but not query."""
    sites = []
    visible = Site.objects.select_related("region").restrict(request.user, "view")
    for slug in request.POST.getlist("sites"):
        site = visible.filter(slug=slug).first()
        if site is None:
            raise Http404("no such site")
        if not user_can(request.user, "query", site):
            raise PermissionDenied(f"you may not query site {site.slug!r}")
        sites.append(site)
    return sites


@login_required
@require_http_methods(["GET", "POST"])
def query_new(request: HttpRequest) -> HttpResponseBase:
    if not selectors.may_query_somewhere(request.user):
        raise PermissionDenied("running federated queries needs the Operator role on a site")
    catalog = selectors.catalog_for_user(request.user)
    status = 200
    if request.method == "POST":
        sites = _target_sites(request)
        form = QueryForm(request.POST, catalog=catalog, dataset=request.POST.get("dataset"))
        # Any queryable site may be named; whether it has the dataset is the service's to say, naming it.
        form.choice("sites").choices = [(s.slug, s.slug) for s in sites]
        status = 422
        if form.is_valid():
            spec = form.build_spec()
            if not form.errors:
                try:
                    query = lifecycle.query_create(
                        actor=Actor.from_request(request), user=request.user, spec=spec, sites=sites,
                        offline_behaviour=form.cleaned_data["offline_behaviour"],
                        deadline_s=form.cleaned_data["deadline_s"], wait_s=form.cleaned_data["wait_hours"] * 3600)
                except QueryForbidden as exc:
                    raise PermissionDenied(exc.message) from exc
                except QueriesError as exc:
                    form.add_error(None, exc.message)
                else:
                    return redirect(reverse("queries:query-detail", args=[query.uuid]))
    else:
        form = QueryForm(catalog=catalog, dataset=request.GET.get("dataset"))
        if form.entry is not None:
            form.initial.update({"dataset": form.entry.name, "sites": list(form.entry.sites)})
    context = {"form": form, "catalog": catalog, "entry": form.entry,
               "aggregate_rows": [(form[f"agg_op_{i}"], form[f"agg_column_{i}"], form[f"agg_q_{i}"])
                                  for i in range(1, AGGREGATE_SLOTS + 1)],
               "filter_rows": [(form[f"filter_column_{i}"], form[f"filter_op_{i}"], form[f"filter_value_{i}"])
                               for i in range(1, FILTER_SLOTS + 1)]}
    return render_page(request, "queries/query_new.html", "query-form", context, status=status)


def _cell(value: Any, type_: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if type_ == "timestamp" and isinstance(value, str):
        return value.replace("T", " ")
    return str(value)


def _result_context(query: FederatedQuery) -> dict[str, Any]:
    merged = query.merged()
    if merged is None:
        return {"merged": None}
    spec = query.spec
    bucket = (spec.get("time_bucket") or {}).get("name", "bucket") if spec.get("time_bucket") else None
    key_names = [*spec.get("group_by", []), *([bucket] if bucket else [])]
    types = merged.get("types") or []
    rows = merged.get("rows") or []
    return {
        "merged": merged,
        "columns": list(zip(merged.get("columns") or [], types, strict=False)),
        "table_rows": [([_cell(v, t) for v, t in zip(row, types, strict=False)], contributors)
                       for row, contributors in zip(rows[:TABLE_ROWS], contributors_of(merged, len(rows)),
                                                    strict=False)],
        "answered_count": sum(1 for s in merged.get("sites") or [] if s.get("status") == "answered"),
        "hidden_rows": max(0, len(rows) - TABLE_ROWS),
        "chart": chart_for(merged, key_names, bucket),
    }


def contributors_of(merged: dict[str, Any], rows: int) -> list[Any]:
    contributors = list(merged.get("contributors") or [])
    return contributors + [""] * (rows - len(contributors))


def _detail_context(query: FederatedQuery) -> dict[str, Any]:
    query.badge = STATE_CLASS.get(query.state, "")  # type: ignore[attr-defined]
    sites = selectors.query_sites(query)
    for row in sites:
        row.badge = STATE_CLASS.get(row.state, "")  # type: ignore[attr-defined]
    return {"query": query, "sites": sites, "events": selectors.query_events(query),
            "spec_text": json.dumps(query.spec, indent=2), **_result_context(query)}


@login_required
@require_GET
def query_detail(request: HttpRequest, query_id: uuid.UUID) -> HttpResponse:
    query = _query_for(request, query_id)
    return render_page(request, "queries/query_detail.html", "query-live", _detail_context(query))


@login_required
@require_GET
def query_csv(request: HttpRequest, query_id: uuid.UUID) -> HttpResponse:
    """The merged result as CSV: the table's columns and every row, values at full precision."""
    query = _query_for(request, query_id)
    merged = query.merged()
    if merged is None:
        raise Http404("this query has no result yet")
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="query-{query.dataset}-{str(query.uuid)[:8]}.csv"'
    writer = csv.writer(response)
    writer.writerow(merged.get("columns") or [])
    for row in merged.get("rows") or []:
        writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
    return response

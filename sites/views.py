"""The operator console for sites and nodes: thin views over selectors and services.

Permissions: every object is looked up through ``restrict`` for this user, so
an object they may not see is a 404, never a hint that it exists; a write on
an object they may see but not operate is a 403. Every change goes through
``sites.services``, which writes its audit event.

HTMX requests get the partial their target names (``page.html#partial``);
the same URLs answer plain requests with the whole page, so every link and
form also works without JavaScript.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.templatetags.static import static
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRefresh

from audit.log_models import NodeLog
from audit.models import AuditEvent
from audit.services import Actor
from core.htmx import HtmxHttpRequest, render_page, wants_partial
from core.permissions import Action, user_can
from orchestrator import keys
from sites import identity, services
from sites.forms import FleetFilterForm, InstallerForm, TokenCreateForm
from sites.models import EnrollmentToken, Node, Site
from sites.selectors import memory_label, node_list, node_models, node_row, site_bundles, site_list, token_list
from sites.telemetry.selectors import site_confirmation, site_map_list, site_telemetry

NODE_EVENTS_SHOWN = 25


def _site_for(request: HttpRequest, slug: str, action: Action = "view") -> Site:
    site = get_object_or_404(Site.objects.select_related("region").restrict(request.user), slug=slug)
    if action != "view" and not user_can(request.user, action, site):
        raise PermissionDenied(f"you may see site {site.slug} but not {action} it")
    return site


def _node_for(request: HttpRequest, node_id: uuid.UUID, action: Action = "view") -> Node:
    nodes = Node.objects.select_related("site__region", "desired", "enrolled_with")
    node = get_object_or_404(nodes.restrict(request.user), uuid=node_id)
    if action != "view" and not user_can(request.user, action, node.site):
        raise PermissionDenied(f"you may see node {node.name} but not {action} it")
    return node


# -- fleet -------------------------------------------------------------------


@login_required
@require_GET
def fleet(request: HtmxHttpRequest) -> HttpResponse:
    form = FleetFilterForm(request.GET or None, user=request.user)
    status = 200
    if form.is_bound and not form.is_valid():
        # A filter that cannot be applied shows nothing rather than everything.
        rows = []
        status = 400
    else:
        filters = form.cleaned_data if form.is_bound else {}
        rows = site_list(
            user=request.user,
            region=filters.get("region") or None,
            status=filters.get("status") or None,
            q=filters.get("q") or None,
        )
    context = {"form": form, "rows": rows, "query": request.GET.urlencode()}
    return render_page(request, "sites/site_list.html", "fleet-table", context, status=status)


# -- site --------------------------------------------------------------------


def _site_context(request: HttpRequest, site: Site, **extra: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "site": site,
        "nodes": node_list(user=request.user, site=site),
        "tokens": token_list(user=request.user, site=site),
        "can_operate": user_can(request.user, "operate", site),
        "token_form": TokenCreateForm(),
        "created_token": None,
    }
    if not wants_partial(request) and "bundles" not in extra:
        # On the whole page only: the tables that refresh themselves every 5 s do not read it.
        context["bundles"] = site_bundles(site=site)
    context.update(extra)
    return context


def _site_page_context(request: HttpRequest, site: Site, **extra: Any) -> dict[str, Any]:
    """Everything the whole site page shows (its first render, or a form posted without HTMX)."""
    telemetry = site_telemetry(site=site)
    live_config = {
        "site": str(site.uuid), "window_s": telemetry.window_s, "history": telemetry.history,
        # The newest point already in the history, per node: the charts skip what they already have.
        "nodes": [{"uuid": str(n.node.uuid), "name": n.node.name, "seq": n.last_seq} for n in telemetry.nodes],
    }
    return _site_context(request, site, confirmation=site_confirmation(site=site), status_oob=False,
                         telemetry=telemetry, live_config=live_config, **extra)


@login_required
@require_GET
def site_detail(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    site = _site_for(request, slug)
    if wants_partial(request):
        # The nodes table refreshing itself also refreshes the site's status line (out of band).
        context = _site_context(request, site, confirmation=site_confirmation(site=site), status_oob=True)
    else:
        context = _site_page_context(request, site)
    return render_page(request, "sites/site_detail.html", "nodes-table", context)


@login_required
@require_POST
def token_create(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    site = _site_for(request, slug, "operate")
    form = TokenCreateForm(request.POST)
    if form.is_valid():
        try:
            token, value = services.token_create(
                actor=Actor.from_request(request), site=site, max_uses=form.cleaned_data["max_uses"],
                lifetime=form.lifetime(), note=form.cleaned_data["note"],
            )
        except services.SitesError as exc:
            form.add_error(_form_field(exc.field), exc.message)
        else:
            # The token value exists only in this response: the database keeps its hash.
            context = _site_context(request, site, created_token={"row": token, "value": value},
                                    public_url=_public_url(request),
                                    oob=wants_partial(request))
            return render_page(request, "sites/site_detail.html", "token-panel", context)
    context = _site_context(request, site, token_form=form)
    return render_page(request, "sites/site_detail.html", "token-panel", context, status=422)


def _form_field(field: str | None) -> str | None:
    return {"lifetime": "lifetime_hours", "max_uses": "max_uses", "note": "note"}.get(field or "")


@login_required
@require_POST
def token_revoke(request: HtmxHttpRequest, slug: str, token_id: uuid.UUID) -> HttpResponse:
    site = _site_for(request, slug, "operate")
    token = get_object_or_404(EnrollmentToken.objects.filter(site=site), uuid=token_id)
    error = ""
    try:
        services.token_revoke(actor=Actor.from_request(request), token=token)
    except services.SitesError as exc:
        error = exc.message
    if not wants_partial(request) and not error:
        return redirect("sites:site-detail", slug=site.slug)
    context = _site_context(request, site, tokens_error=error)
    return render_page(request, "sites/site_detail.html", "tokens-table", context, status=400 if error else 200)


@login_required
@require_POST
def installer_download(request: HttpRequest, slug: str) -> HttpResponse:
    """The site's installer script with a token baked in.

    The token travels in the POST body, never in a URL, so it stays out of
    browser history and access logs.
    """
    from sites.installer import InstallerError, render_installer

    site = _site_for(request, slug, "operate")
    form = InstallerForm(request.POST)
    if not form.is_valid():
        return HttpResponse("token: an enrollment token is required", status=400, content_type="text/plain")
    try:
        services.token_check(site=site, value=form.cleaned_data["token"])
    except services.SitesError as exc:
        return HttpResponse(f"token: {exc.message}", status=400, content_type="text/plain")
    try:
        script = render_installer(url=_public_url(request), token=form.cleaned_data["token"],
                                  fingerprint=keys.public_key_fingerprint(), site=site)
    except InstallerError as exc:
        # A value that cannot go into a script (an EDGEWISE_PUBLIC_URL with a query, say): say which.
        return HttpResponse(str(exc), status=400, content_type="text/plain")
    response = HttpResponse(script, content_type="text/x-shellscript")
    response["Content-Disposition"] = f'attachment; filename="edgewise-install-{site.slug}.sh"'
    response["Cache-Control"] = "no-store"
    return response


def _public_url(request: HttpRequest) -> str:
    return settings.PUBLIC_URL or request.build_absolute_uri("/").rstrip("/")


# -- node --------------------------------------------------------------------


@login_required
@require_GET
def node_detail(request: HtmxHttpRequest, node_id: uuid.UUID) -> HttpResponse:
    node = _node_for(request, node_id)
    if wants_partial(request):
        # The models panel refreshing itself, with the generation and actual state beside it (out of band).
        context = {"node": node, "row": node_row(node), "models": node_models(node), "oob": True,
                   "actual_json": _actual_json(node)}
        return render_page(request, "sites/node_detail.html", "node-models", context)
    events = AuditEvent.objects.filter(object_id=str(node.uuid)).restrict(request.user)[:NODE_EVENTS_SHOWN]
    context = {
        "node": node,
        "row": node_row(node),
        "site": node.site,
        "events": events,
        "can_operate": user_can(request.user, "operate", node.site),
        "memory": memory_label(int(node.hardware["memory_mb"])) if node.hardware.get("memory_mb") else "",
        "uptime": _duration(node.health.get("uptime_s")),
        "actual_json": _actual_json(node),
        "models": node_models(node),
        "audit_log": NodeLog.objects.filter(node_uuid=node.uuid).restrict(request.user).first(),
    }
    return render_page(request, "sites/node_detail.html", "node-models", context)


def _actual_json(node: Node) -> str:
    return json.dumps(node.actual_state, indent=2, sort_keys=True) if node.actual_state else ""


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds <= 0:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


@login_required
@require_POST
def node_revoke(request: HtmxHttpRequest, node_id: uuid.UUID) -> HttpResponseBase:
    node = _node_for(request, node_id, "operate")
    error = ""
    try:
        services.node_revoke(actor=Actor.from_request(request), node=node)
    except services.SitesError as exc:
        error = exc.message
    from_node_page = request.POST.get("next") == "node"
    if from_node_page:
        if error:
            return HttpResponse(error, status=400, content_type="text/plain")
        return HttpResponseClientRefresh() if request.htmx else redirect("sites:node-detail", node_id=node.uuid)
    if not wants_partial(request) and not error:
        return redirect("sites:site-detail", slug=node.site.slug)
    context = _site_context(request, node.site, nodes_error=error)
    return render_page(request, "sites/site_detail.html", "nodes-table", context, status=400 if error else 200)


@login_required
@require_POST
def node_identity_accept(request: HtmxHttpRequest, node_id: uuid.UUID) -> HttpResponseBase:
    """Make the identity key the node presented its registered one: who may revoke the node may do this."""
    node = _node_for(request, node_id, "operate")
    try:
        identity.node_identity_accept(actor=Actor.from_request(request), node=node)
    except services.SitesError as exc:
        return HttpResponse(exc.message, status=400, content_type="text/plain")
    return HttpResponseClientRefresh() if request.htmx else redirect("sites:node-detail", node_id=node.uuid)


# -- fleet map ---------------------------------------------------------------


def _map_config(request: HttpRequest) -> dict[str, Any]:
    return {
        "data_url": reverse("sites:fleet-map-data"),
        "basemap_url": static("vendor/world-atlas/countries-110m.json"),
        # Empty unless the installation is connected and configured a tile server: nothing is fetched otherwise.
        "tile_url": settings.MAP_TILE_URL,
        "tile_attribution": settings.MAP_TILE_ATTRIBUTION,
        "server_time": timezone.now().isoformat(),
        "sites": site_map_list(user=request.user),
    }


@login_required
@require_GET
def fleet_map(request: HttpRequest) -> HttpResponse:
    """Every site the user may see on a map, coloured by status, clustered per region, live."""
    config = _map_config(request)
    unplaced = [s for s in config["sites"] if s["lat"] is None or s["lon"] is None]
    return render(request, "sites/fleet_map.html", {"map_config": config, "unplaced": unplaced})


@login_required
@require_GET
def fleet_map_data(request: HttpRequest) -> JsonResponse:
    """The map's sites as JSON: what the map reloads when told something changed, and every 5 s as a fallback."""
    response = JsonResponse({"server_time": timezone.now().isoformat(), "sites": site_map_list(user=request.user)})
    response["Cache-Control"] = "no-store"
    return response

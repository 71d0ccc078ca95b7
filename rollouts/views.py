"""The rollouts console and the approvals inbox: thin views over selectors and services.

Permissions: a rollout is visible to whoever may view at least one site it
touches (404 otherwise); starting, pausing, resuming, promoting, changing and
aborting need ``operate`` on every site it touches (403); creating one needs
``operate`` on every site of its target (an estate-wide target needs the
estate-wide role); deciding needs the role its approval rules name on every
site, and is refused to the requester. The rollout page polls its live panel
(``rollout-live``) while the rollout is open, so it updates without a reload.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from audit.services import Actor
from core.htmx import render_page, wants_partial
from core.permissions import may_anywhere, may_everywhere, user_can
from models_registry.models import Model, ModelVersion
from models_registry.views import can_view_registry, model_detail_context, object_uuid, target_site_check
from policies.models import Approval
from policies.selectors import approvals_for, rollout_policy_current
from rollouts import selectors, services
from rollouts.forms import RolloutForm
from rollouts.models import TERMINAL_STATES, Rollout, RolloutState
from rollouts.visibility import rollout_view
from sites.models import Node, Region, Site

ACTIONS = {
    "start": services.rollout_start,
    "pause": services.rollout_pause,
    "resume": services.rollout_resume,
    "promote": services.rollout_promote,
    "abort": services.rollout_abort,
}


def _rollout_for(request: HttpRequest, rollout_id: uuid.UUID) -> Rollout:
    rollout = selectors.rollout_get(user=request.user, rollout_uuid=rollout_id)
    if rollout is None:
        raise Http404("no such rollout")
    return rollout


def _detail_url(rollout: Rollout) -> str:
    return reverse("rollouts:rollout-detail", args=[rollout.uuid])


def _done(request: HttpRequest, rollout: Rollout) -> HttpResponseBase:
    if wants_partial(request):
        return HttpResponseClientRedirect(_detail_url(rollout))
    return redirect(_detail_url(rollout))


@login_required
@require_GET
def rollout_list(request: HttpRequest) -> HttpResponse:
    rollouts = list(selectors.rollout_list(user=request.user)[:200])
    # Progress counts the nodes the user may see (every node for an estate-wide role).
    site_ids = None if may_everywhere(request.user, "view") else set(
        Site.objects.restrict(request.user).values_list("pk", flat=True))
    rows = [{"rollout": r, "progress": selectors.rollout_progress(r, site_ids)} for r in rollouts]
    context = {"rows": rows, "can_create": may_anywhere(request.user, "operate"),
               "live": any(r.state not in TERMINAL_STATES for r in rollouts)}
    return render_page(request, "rollouts/rollout_list.html", "rollout-table", context)


def _form(request: HttpRequest, data: Any = None) -> RolloutForm:
    sites = Site.objects.select_related("region").order_by("name").restrict(request.user, "operate")
    regions = Region.objects.order_by("slug").restrict(request.user, "operate")
    return RolloutForm(data, defaults=rollout_policy_current()[1].defaults,
                       regions=list(regions.values_list("slug", flat=True)),
                       sites=[(s.slug, f"{s.name} ({s.region.slug})") for s in sites])


def _check_target(request: HttpRequest, target: dict[str, Any]) -> None:
    if not target["regions"] and not target["sites"] and not target.get("nodes"):
        if not may_everywhere(request.user, "operate"):
            raise PermissionDenied("an estate-wide rollout needs the estate-wide Operator role")
        return
    sites = (Site.objects.filter(slug__in=target["sites"]) | Site.objects.filter(region__slug__in=target["regions"])
             | Site.objects.filter(nodes__uuid__in=target.get("nodes") or []))
    for site in sites.distinct():
        if not user_can(request.user, "operate", site):
            raise PermissionDenied(f"you may not operate site {site.slug}")


@login_required
@require_http_methods(["GET", "POST"])
def rollout_create(request: HttpRequest) -> HttpResponseBase:
    if not may_anywhere(request.user, "operate"):
        raise PermissionDenied("creating a rollout needs the Operator role somewhere")
    form = _form(request, request.POST or None)
    status = 200
    if request.method == "POST":
        status = 422
        if form.is_valid():
            target = form.target()
            _check_target(request, target)
            try:
                rollout = services.rollout_create(actor=Actor.from_request(request), user=request.user,
                                                  version=form.cleaned_data["version"], target=target,
                                                  strategy=form.strategy())
            except services.RolloutError as exc:
                field = exc.field if exc.field in form.fields else None
                form.add_error(field, exc.message)
            else:
                return redirect(_detail_url(rollout))
    return render(request, "rollouts/rollout_form.html", {"form": form}, status=status)


@login_required
@require_POST
def deploy(request: HttpRequest, slug: str) -> HttpResponseBase:
    """The model page's Deploy: a one-wave rollout under the rollout policy (``services.deploy_create``)."""
    if not can_view_registry(request.user):
        raise PermissionDenied("the model registry needs a role on at least one site")
    model = get_object_or_404(Model, slug=slug)
    version = get_object_or_404(ModelVersion, model=model, uuid=object_uuid(request.POST.get("version")))
    sites = []
    for site_slug in request.POST.getlist("sites"):
        site = get_object_or_404(Site.objects.all().restrict(request.user), slug=site_slug)
        target_site_check(request, site)
        sites.append(site)
    nodes = []
    for node_id in request.POST.getlist("nodes"):
        node = get_object_or_404(Node.objects.select_related("site").restrict(request.user), uuid=object_uuid(node_id))
        target_site_check(request, node.site)
        nodes.append(node)
    try:
        rollout = services.deploy_create(actor=Actor.from_request(request), user=request.user, version=version,
                                         sites=sites, nodes=nodes)
    except services.RolloutError as exc:
        context = model_detail_context(request, model, deploy_error=exc.message)
        return render_page(request, "models_registry/model_detail.html", "deploy-panel", context, status=422)
    return _done(request, rollout)


def _detail_context(request: HttpRequest, rollout: Rollout, **extra: Any) -> dict[str, Any]:
    user = request.user
    can_operate = selectors.user_may(user, "operate", rollout)
    decidable = (rollout.state == RolloutState.PENDING_APPROVAL and rollout.requested_by_id != user.pk
                 and selectors.approval_role_held(user, rollout.approval_role or "Approver", rollout))
    decisions = list(approvals_for("rollout", rollout.uuid))
    view = rollout_view(user, rollout)
    site_ids = None if view.sees_all else view.visible_ids
    events = rollout.events.select_related("node").order_by("-at", "-pk")
    if site_ids is not None:
        events = events.filter(Q(node__isnull=True) | Q(node__site_id__in=site_ids))
    events_shown = list(events[:200])
    for event in events_shown:
        event.message = view.text(event.message)
    context = {
        "rollout": rollout,
        "view": view,
        "reason": view.text(rollout.reason),
        "gate": view.gate(rollout.last_gate),
        "excluded": view.excluded(rollout.plan.get("excluded") or []),
        "target_sites": [s for s in rollout.target.get("sites") or [] if view.shows_site(s)],
        "progress": selectors.rollout_progress(rollout, site_ids),
        "waves": selectors.rollout_waves(rollout, site_ids),
        "events": events_shown,
        "decisions": [{"approval": a, "current": a.plan_hash == rollout.plan_hash} for a in decisions],
        "sites": selectors.rollout_sites(rollout, site_ids),
        "can_operate": can_operate,
        "can_decide": decidable,
        "live": rollout.state not in TERMINAL_STATES,
        "actions": _actions(rollout) if can_operate else [],
        "error": "",
    }
    context.update(extra)
    return context


def _actions(rollout: Rollout) -> list[str]:
    state = rollout.state
    actions = []
    if state == RolloutState.READY:
        actions.append("start")
    if state == RolloutState.PROGRESSING:
        actions.append("pause")
    if state == RolloutState.PAUSED:
        actions.append("resume")
    if state in (RolloutState.PROGRESSING, RolloutState.PAUSED) and rollout.wave_phase != "starting":
        actions.append("promote")
    if state not in TERMINAL_STATES:
        actions.append("abort")
    return actions


@login_required
@require_GET
def rollout_detail(request: HttpRequest, rollout_id: uuid.UUID) -> HttpResponse:
    rollout = _rollout_for(request, rollout_id)
    return render_page(request, "rollouts/rollout_detail.html", "rollout-live", _detail_context(request, rollout))


@login_required
@require_POST
def rollout_action(request: HttpRequest, rollout_id: uuid.UUID, action: str) -> HttpResponseBase:
    rollout = _rollout_for(request, rollout_id)
    service = ACTIONS.get(action)
    if service is None:
        raise Http404("no such action")
    if not selectors.user_may(request.user, "operate", rollout):
        raise PermissionDenied("you may see this rollout but not operate every site it touches")
    try:
        service(actor=Actor.from_request(request), rollout=rollout)
    except services.RolloutError as exc:
        return render_page(request, "rollouts/rollout_detail.html", "rollout-live",
                       _detail_context(request, rollout, error=exc.message), status=422)
    return _done(request, rollout)


@login_required
@require_POST
def rollout_decide(request: HttpRequest, rollout_id: uuid.UUID, decision: str) -> HttpResponseBase:
    rollout = _rollout_for(request, rollout_id)
    if decision not in ("approve", "reject"):
        raise Http404("no such decision")
    decide = services.rollout_approve if decision == "approve" else services.rollout_reject
    try:
        decide(actor=Actor.from_request(request), user=request.user, rollout=rollout,
               plan_hash=request.POST.get("plan_hash", ""), comment=request.POST.get("comment", "")[:500])
    except services.RolloutError as exc:
        if exc.status == 403:
            raise PermissionDenied(exc.message) from exc
        return render_page(request, "rollouts/rollout_detail.html", "rollout-live",
                       _detail_context(request, rollout, error=exc.message), status=422)
    return _done(request, rollout)


@login_required
@require_GET
def approval_list(request: HttpRequest) -> HttpResponse:
    visible = selectors.rollout_list(user=request.user).values("uuid")
    history = Approval.objects.filter(subject_type="rollout", subject_uuid__in=visible).select_related("user")[:100]
    rollouts = {r.uuid: r for r in Rollout.objects.filter(uuid__in=[a.subject_uuid for a in history])
                .select_related("version__model")}
    return render(request, "rollouts/approval_list.html", {
        "inbox": selectors.approval_inbox(user=request.user),
        "history": [{"approval": a, "rollout": rollouts.get(a.subject_uuid)} for a in history],
    })

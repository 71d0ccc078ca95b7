"""The model registry's console: thin views over selectors and services.

Permissions: the registry is estate-wide, so seeing it needs ``view`` on at
least one site (or staff); creating models and uploading versions needs the
estate-wide Operator or Admin role (or superuser); deploying needs ``operate``
on every target site, where a site the user cannot see is a 404 and one they
can see but not operate is a 403.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect, HttpResponseClientRefresh

from audit.services import Actor
from core.htmx import render_page, wants_partial
from core.permissions import may_anywhere, may_everywhere, user_can
from models_registry import selectors, services
from models_registry.forms import ModelCreateForm, VersionUploadForm
from models_registry.models import Deployment, Model, VersionStatus
from sites.models import Site

PENDING = (VersionStatus.UPLOADED, VersionStatus.VALIDATING)


def can_view_registry(user: Any) -> bool:
    if not user.is_authenticated:
        return False
    return user.is_staff or user.is_superuser or may_anywhere(user, "view")


def can_manage_registry(user: Any) -> bool:
    """Estate-wide Operator or Admin: a model goes everywhere, so a regional grant is not enough."""
    return may_everywhere(user, "operate")


def _viewer(request: HttpRequest) -> None:
    if not can_view_registry(request.user):
        raise PermissionDenied("you may not see the model registry")


def _manager(request: HttpRequest) -> None:
    if not can_manage_registry(request.user):
        raise PermissionDenied("creating models and uploading versions needs the estate-wide Operator role")


def _detail_url(model: Model) -> str:
    return reverse("models_registry:model-detail", args=[model.slug])


def _done(request: HttpRequest, model: Model) -> HttpResponseBase:
    if wants_partial(request):
        return HttpResponseClientRedirect(_detail_url(model))
    return redirect(_detail_url(model))


@login_required
@require_GET
def model_list(request: HttpRequest) -> HttpResponse:
    _viewer(request)
    return render(request, "models_registry/model_list.html", {
        "rows": selectors.model_list(), "can_manage": can_manage_registry(request.user)})


@login_required
@require_http_methods(["GET", "POST"])
def model_create(request: HttpRequest) -> HttpResponseBase:
    _manager(request)
    form = ModelCreateForm(request.POST or None)
    status = 200
    if request.method == "POST":
        status = 422
        if form.is_valid():
            try:
                model = services.model_create(actor=Actor.from_request(request), **form.cleaned_data)
            except services.RegistryError as exc:
                form.add_error(exc.field if exc.field in form.fields else None, exc.message)
            else:
                return redirect(_detail_url(model))
    return render(request, "models_registry/model_form.html", {"form": form}, status=status)


def model_detail_context(request: HttpRequest, model: Model, **extra: Any) -> dict[str, Any]:
    """The model page's context (the deploy panel's too, which the rollouts app answers)."""
    versions = list(model.versions.prefetch_related("events", "variants").order_by("-created_at", "-pk"))
    sites, nodes = selectors.operable_targets(request.user)
    operable = set(sites.values_list("pk", flat=True))
    context: dict[str, Any] = {
        "model": model,
        "versions": [{
            "version": v,
            "deployments": [{"row": d, "can_remove": d.target_site.pk in operable}
                            for d in selectors.deployment_list(user=request.user, version=v)],
            "placements": selectors.model_placements(v, user=request.user) if v.status == VersionStatus.VALID else [],
        } for v in versions],
        "pending": any(v.status in PENDING for v in versions),
        # Newest first, those rolled back last: the picker's first choice is never one of them.
        "valid_versions": sorted((v for v in versions if v.status == VersionStatus.VALID),
                                 key=lambda v: v.rolled_back_at is not None),
        "can_manage": can_manage_registry(request.user),
        "deploy_sites": sites,
        "deploy_nodes": nodes,
        "can_deploy": sites.exists() or nodes.exists(),
        "upload_form": VersionUploadForm(),
    }
    context.update(extra)
    return context


@login_required
@require_GET
def model_detail(request: HttpRequest, slug: str) -> HttpResponseBase:
    _viewer(request)
    model = get_object_or_404(Model, slug=slug)
    context = model_detail_context(request, model)
    if wants_partial(request) and request.GET.get("poll") and not context["pending"]:
        # Validation finished: reload once so deploy choices and placements follow.
        return HttpResponseClientRefresh()
    return render_page(request, "models_registry/model_detail.html", "versions-panel", context)


@login_required
@require_POST
def version_upload(request: HttpRequest, slug: str) -> HttpResponseBase:
    _viewer(request)
    _manager(request)
    model = get_object_or_404(Model, slug=slug)
    form = VersionUploadForm(request.POST, request.FILES)
    if form.is_valid():
        try:
            services.model_version_upload(actor=Actor.from_request(request), model=model,
                                          version=form.cleaned_data["version"], file=form.cleaned_data["file"],
                                          **form.requirements())
        except services.RegistryError as exc:
            form.add_error(exc.field if exc.field in form.fields else None, exc.message)
        else:
            return _done(request, model)
    context = model_detail_context(request, model, upload_form=form)
    template = "models_registry/model_detail.html"
    return render_page(request, template, "upload-panel", context, status=422)


def target_site_check(request: HttpRequest, site: Site) -> None:
    if not user_can(request.user, "operate", site):
        raise PermissionDenied(f"you may see site {site.slug} but not operate it")


def object_uuid(value: str | None) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError as exc:
        raise Http404("no such object") from exc


@login_required
@require_POST
def deployment_remove(request: HttpRequest, slug: str, deployment_id: uuid.UUID) -> HttpResponseBase:
    _viewer(request)
    model = get_object_or_404(Model, slug=slug)
    deployment = get_object_or_404(
        Deployment.objects.select_related("site", "node__site", "version__model"),
        uuid=deployment_id, version__model=model)
    site = deployment.target_site
    if not Site.objects.filter(pk=site.pk).restrict(request.user).exists():
        raise Http404("no such deployment")
    target_site_check(request, site)
    try:
        services.deployment_remove(actor=Actor.from_request(request), deployment=deployment)
    except services.RegistryError as exc:
        return HttpResponse(exc.message, status=422, content_type="text/plain")
    return _done(request, model)

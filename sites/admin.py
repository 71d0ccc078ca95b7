"""Regions, sites, nodes and tokens in the Django admin, through the same services as the console.

A change made here audits and republishes exactly as one made in the console:
a site's or region's new attributes reach its nodes' signed policy (a new
desired state), a node is revoked and a token created or revoked by their
services. What has no service is read-only here: a node's name, role and
site (they shape placement; a node changes by enrolling, syncing or being
revoked), a token's terms once issued, desired states (signed, published by
the control plane). Sites, nodes, tokens and desired states are never
deleted here: a node or token is revoked instead, and deleting a site would
orphan its tokens, deployments, queries and audit trail.

Object permissions (guardian's pages on regions and sites) are shown but not
edited here: roles are granted with ``policies.permissions.role_grant``,
which audits the grant.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone
from guardian.admin import GuardedModelAdmin

from audit.admin import AuditedAdminMixin
from audit.services import Actor
from core.admin import NotFoundAdminMixin, ReadOnlyAdmin
from orchestrator.models import DesiredState
from sites import services
from sites.models import EnrollmentToken, Node, Region, Site

SITE_FIELDS = ("region", "slug", "name", "jurisdiction", "clearance", "connectivity", "expired_bundles", "latitude",
               "longitude", "labels")


def _pk_or_404(model: Any, value: str) -> Any:
    """``value`` as ``model``'s primary key, or 404 when it cannot be one (``abc`` for an integer key)."""
    field = model._meta.pk
    try:
        return field.clean(unquote(value), None)
    except ValidationError:
        raise Http404(f"no {model._meta.verbose_name} with id {value!r}") from None


class GuardedAdmin(NotFoundAdminMixin, GuardedModelAdmin):  # type: ignore[misc]  # guardian: a str, stubs: a ClassVar
    """guardian's object-permission pages: 404 for ids that name nothing, and shown read-only."""

    def obj_perms_manage_view(self, request: HttpRequest, object_pk: str) -> HttpResponse:
        self.get_object(request, object_pk)
        self._read_only(request)
        return super().obj_perms_manage_view(request, object_pk)

    def obj_perms_manage_user_view(self, request: HttpRequest, object_pk: str, user_id: str) -> HttpResponse:
        self.get_object(request, object_pk)
        _pk_or_404(get_user_model(), user_id)
        self._read_only(request)
        return super().obj_perms_manage_user_view(request, object_pk, user_id)

    def obj_perms_manage_group_view(self, request: HttpRequest, object_pk: str, group_id: str) -> HttpResponse:
        self.get_object(request, object_pk)
        _pk_or_404(Group, group_id)
        self._read_only(request)
        return super().obj_perms_manage_group_view(request, object_pk, group_id)

    @staticmethod
    def _read_only(request: HttpRequest) -> None:
        # guardian would assign the permissions itself, without the audit event a role grant writes.
        if request.method == "POST":
            raise PermissionDenied("object permissions are granted as roles (policies.permissions.role_grant), "
                                   "which audits them; they are not edited in the admin")


@admin.register(Region)
class RegionAdmin(AuditedAdminMixin, GuardedAdmin):  # type: ignore[misc]  # as GuardedAdmin
    list_display = ["name", "slug"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}

    def save_model(self, request: Any, obj: Region, form: Any, change: bool) -> None:
        actor = Actor.from_request(request)
        data = form.cleaned_data
        if change:
            services.region_update(actor=actor, region=obj, **{name: data[name] for name in form.changed_data})
            return
        created = services.region_create(actor=actor, slug=data["slug"], name=data["name"],
                                         description=data.get("description", ""))
        obj.pk, obj.uuid = created.pk, created.uuid

    # Deleting an empty region has no consequence beyond it (its sites would
    # block it: PROTECT); AuditedAdminMixin records it.


@admin.register(Site)
class SiteAdmin(GuardedAdmin):
    list_display = ["name", "slug", "region", "jurisdiction", "clearance", "connectivity"]
    list_filter = ["region", "connectivity", "clearance"]
    search_fields = ["name", "slug", "jurisdiction"]
    prepopulated_fields = {"slug": ["name"]}
    fields = SITE_FIELDS

    def save_model(self, request: Any, obj: Site, form: Any, change: bool) -> None:
        actor = Actor.from_request(request)
        data = form.cleaned_data
        if change:
            # Only what the form changed: site_update audits it and republishes the site's nodes.
            services.site_update(actor=actor, site=obj, **{name: data[name] for name in form.changed_data})
            return
        fields = {name: data[name] for name in SITE_FIELDS if name not in {"region", "slug", "name"}}
        created = services.site_create(actor=actor, region=data["region"], slug=data["slug"], name=data["name"],
                                       **fields)
        obj.pk, obj.uuid, obj.created_at = created.pk, created.uuid, created.created_at

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(Node)
class NodeAdmin(ReadOnlyAdmin):
    """Nodes enroll with a token; the admin can only revoke them."""

    list_display = ["name", "site", "role", "status", "last_seen_at", "runtime_version", "revoked_at"]
    list_filter = ["role", "status", "site__region"]
    search_fields = ["name", "uuid", "site__name"]
    actions = ["revoke"]

    def has_revoke_permission(self, request: Any) -> bool:
        return bool(request.user.has_perm("sites.change_node"))

    @admin.action(description="Revoke the selected nodes", permissions=["revoke"])
    def revoke(self, request: Any, queryset: QuerySet[Node]) -> None:
        actor = Actor.from_request(request)
        revoked = 0
        for node in queryset:
            try:
                services.node_revoke(actor=actor, node=node)
            except services.SitesError as exc:
                self.message_user(request, f"{node}: {exc.message}", messages.WARNING)
            else:
                revoked += 1
        if revoked:
            self.message_user(request, f"revoked {revoked} node(s); they are refused on their next sync")


class TokenAddForm(forms.ModelForm):
    class Meta:
        model = EnrollmentToken
        fields = ["site", "note", "max_uses", "expires_at"]

    def clean(self) -> dict[str, Any]:
        # The admin cannot show an error once save_model runs: refuse here what token_create would.
        data = super().clean() or {}
        max_uses, expires_at = data.get("max_uses"), data.get("expires_at")
        if max_uses is not None and not 1 <= max_uses <= 10_000:
            self.add_error("max_uses", "a token allows between 1 and 10000 uses")
        if expires_at is not None:
            lifetime = expires_at - timezone.now()
            if not dt.timedelta(minutes=1) <= lifetime <= services.MAX_TOKEN_LIFETIME:
                self.add_error("expires_at", "a token expires between 1 minute and 30 days from now")
        return data


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(NotFoundAdminMixin, admin.ModelAdmin):
    list_display = ["prefix", "site", "uses", "max_uses", "expires_at", "revoked_at", "created_by"]
    list_filter = ["site"]
    readonly_fields = ["uuid", "token_hash", "prefix", "uses", "created_by", "created_at"]
    actions = ["revoke"]

    def get_form(self, request: Any, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = TokenAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request: Any, obj: Any = None) -> Any:
        return TokenAddForm.Meta.fields if obj is None else super().get_fields(request, obj)

    def get_readonly_fields(self, request: Any, obj: Any = None) -> Any:
        return [] if obj is None else self.readonly_fields

    def save_model(self, request: Any, obj: EnrollmentToken, form: Any, change: bool) -> None:
        data = form.cleaned_data
        created, value = services.token_create(
            actor=Actor.from_request(request), site=data["site"], max_uses=data["max_uses"],
            lifetime=data["expires_at"] - timezone.now(), note=data.get("note", ""))
        obj.pk, obj.uuid, obj.prefix = created.pk, created.uuid, created.prefix
        self.message_user(request, f"enrollment token for {created.site.slug}: {value} (shown only now)",
                          messages.WARNING)

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False  # a token's terms are fixed when it is issued; revoke it and issue another

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_revoke_permission(self, request: Any) -> bool:
        return bool(request.user.has_perm("sites.change_enrollmenttoken"))

    @admin.action(description="Revoke the selected tokens", permissions=["revoke"])
    def revoke(self, request: Any, queryset: QuerySet[EnrollmentToken]) -> None:
        actor = Actor.from_request(request)
        for token in queryset:
            try:
                services.token_revoke(actor=actor, token=token)
            except services.SitesError as exc:
                self.message_user(request, f"{token.prefix}: {exc.message}", messages.WARNING)
            else:
                self.message_user(request, f"revoked token {token.prefix}")


@admin.register(DesiredState)
class DesiredStateAdmin(ReadOnlyAdmin):
    """Signed by the control plane; a node refuses a generation lower than the one it applied."""

    list_display = ["node", "generation", "published_at", "key_fingerprint"]
    readonly_fields = ["node", "generation", "content_hash", "payload", "signature", "key_fingerprint", "published_at"]

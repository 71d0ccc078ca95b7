from __future__ import annotations

from django.contrib import admin
from guardian.admin import GuardedModelAdmin

from audit.admin import AuditedAdminMixin
from sites.models import DesiredState, EnrollmentToken, Node, Region, Site


@admin.register(Region)
class RegionAdmin(AuditedAdminMixin, GuardedModelAdmin):
    list_display = ["name", "slug"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}


@admin.register(Site)
class SiteAdmin(AuditedAdminMixin, GuardedModelAdmin):
    list_display = ["name", "slug", "region", "jurisdiction", "clearance", "connectivity"]
    list_filter = ["region", "connectivity", "clearance"]
    search_fields = ["name", "slug", "jurisdiction"]
    prepopulated_fields = {"slug": ["name"]}


@admin.register(Node)
class NodeAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["name", "site", "role", "status", "last_seen_at", "runtime_version", "revoked_at"]
    list_filter = ["role", "status", "site__region"]
    search_fields = ["name", "uuid", "site__name"]
    readonly_fields = ["uuid", "credential_hash", "enrolled_at", "enrolled_with", "last_seen_at", "last_seen_ip",
                       "hardware", "actual_state", "health", "applied_generation", "status"]


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["prefix", "site", "uses", "max_uses", "expires_at", "revoked_at", "created_by"]
    list_filter = ["site"]
    readonly_fields = ["uuid", "token_hash", "prefix", "uses", "created_by", "created_at"]


@admin.register(DesiredState)
class DesiredStateAdmin(admin.ModelAdmin):
    list_display = ["node", "generation", "published_at", "key_fingerprint"]
    readonly_fields = ["node", "generation", "content_hash", "payload", "signature", "key_fingerprint", "published_at"]

    def has_add_permission(self, request: object) -> bool:
        return False

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class PoliciesConfig(AppConfig):
    name = "policies"
    verbose_name = "Policies and roles"

    def ready(self) -> None:
        # The role groups are data the application owns: they are brought up to
        # date after every migrate. Permissions are created app by app during
        # post_migrate, so this runs for every app's signal (it is idempotent)
        # and the last run sees them all.
        post_migrate.connect(_roles_sync_after_migrate, dispatch_uid="policies-roles-sync")
        from django.contrib import admin

        from orchestrator import features
        from policies import auth
        from policies.node_feature import PolicyFeature

        auth.connect()
        admin.site.login_form = auth.ThrottledAdminAuthenticationForm

        features.register(PolicyFeature())


def _roles_sync_after_migrate(sender: AppConfig, **kwargs: Any) -> None:
    from policies.permissions import roles_sync

    if sender.label == "sites" or sender.label == "audit":
        roles_sync()

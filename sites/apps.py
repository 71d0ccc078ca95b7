from __future__ import annotations

from django.apps import AppConfig


class SitesConfig(AppConfig):
    name = "sites"
    verbose_name = "Regions, sites and nodes"

    def ready(self) -> None:
        # The audit trail (an app below this one) names nodes, and finds their identity keys, through these.
        from audit.estate import node_names_register
        from audit.export import node_keys_register
        from sites.selectors import node_identity_keys, node_names

        node_names_register(node_names)
        node_keys_register(node_identity_keys)

from __future__ import annotations

from django.apps import AppConfig


class QueriesConfig(AppConfig):
    """Federated queries' governance: the dataset catalog, queries and their answers."""

    name = "queries"
    label = "queries"
    verbose_name = "Federated queries"

    def ready(self) -> None:
        from orchestrator import features
        from queries.node_feature import QueriesFeature

        features.register(QueriesFeature())

from __future__ import annotations

from django.apps import AppConfig


class QueriesConfig(AppConfig):
    """Federated queries' governance: the dataset catalog, queries and their answers (a part of ``policies``)."""

    name = "policies.queries"
    label = "queries"
    verbose_name = "Federated queries"

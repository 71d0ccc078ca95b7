"""Federated queries' part in every node's sync (see ``orchestrator.features``)."""

from __future__ import annotations

from orchestrator.features import NodeFeatureBase, NodeSync
from queries.services.catalog import dataset_catalog_report
from queries.services.lifecycle import query_deliveries


class QueriesFeature(NodeFeatureBase):
    """The node's dataset catalog from its report; the queries waiting for its answer in the sync's answer."""

    name = "queries"

    def report(self, sync: NodeSync) -> None:
        # node.actual_state still holds the last report: the catalog is written only when it changed.
        sync.audited |= dataset_catalog_report(node=sync.node, report=sync.actual.detail.get("datasets"),
                                               actor=sync.actor)

    def answer(self, sync: NodeSync) -> None:
        # Marks new ones sent (an event row each): a query delivered is not lost to a commit that was not durable.
        queries = query_deliveries(node=sync.node)
        sync.audited |= bool(queries)
        sync.answer["queries"] = queries

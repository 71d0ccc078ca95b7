"""Federated queries' part in every node's sync (see ``orchestrator.features``)."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from edge_runtime.data.wire import QueryResult
from orchestrator.features import NodeFeatureBase, NodeSync
from queries.services import QueriesError
from queries.services.catalog import dataset_catalog_report
from queries.services.lifecycle import query_deliveries
from queries.services.results import query_result_record

# A bundle out's answers: answers/<n>.json, one QueryResult each, as a node posts it.
ANSWER_PREFIX = "answers/"


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

    def carried(self, sync: NodeSync, members: Mapping[str, bytes]) -> None:
        # Every answer taken or finally refused is acknowledged, as the result endpoint's answers are: the node
        # does not carry it again. An answer to a query already final (answered by another path) is a repeat.
        taken: list[str] = sync.answer.setdefault("answers", [])
        notes: list[str] = sync.answer.setdefault("notes", [])
        for name in sorted(n for n in members if n.startswith(ANSWER_PREFIX)):
            body = members[name]  # one at a time: the mapping reads each from disk when asked
            try:
                result = QueryResult.model_validate_json(body)
            except ValidationError as exc:
                notes.append(f"{name}: not a query answer ({exc.errors()[0]['msg']}); not taken")
                continue
            try:
                _, stored = query_result_record(node=sync.node, query_id=result.query_id, result=result,
                                                actor=sync.actor)
            except QueriesError as exc:
                notes.append(f"the answer to query {result.query_id} was refused: {exc.message}")
            else:
                sync.audited |= stored
            taken.append(result.query_id)

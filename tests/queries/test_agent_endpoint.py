"""The agent side of a query: offered in every sync until answered, answers stored once, scoped to the node."""

from __future__ import annotations

from typing import Any

from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from audit.models import AuditEvent
from edge_runtime import protocol, signing
from edge_runtime.data.catalog import Catalog
from edge_runtime.data.engine import run_query
from edge_runtime.data.wire import QueryResult
from edge_runtime.policy.data import DataPolicy, DatasetRule, SiteFacts
from orchestrator import keys
from queries.models import QuerySite
from tests.queries.conftest import Estate
from tests.queries.helpers import create


def _sync(client: Client, node: Any, credential: str) -> dict[str, Any]:
    body = protocol.SyncRequest(actual=protocol.ActualState(applied_generation=node.applied_generation,
                                                            detail=node.actual_state.get("detail", {})))
    response = client.post(f"/agent/v1/nodes/{node.uuid}/sync", body.model_dump_json(),
                           content_type="application/json", headers={"Authorization": f"Bearer {credential}"})
    assert response.status_code == 200, response.content
    return response.json()


def _answer(estate: Estate, query: Any) -> QueryResult:
    catalog = Catalog.from_config({"datasets": estate.entries["plant-berlin"]}, base_dir=estate.folders["plant-berlin"])
    return run_query(query.spec, catalog=catalog, policy=DataPolicy(datasets={"readings": DatasetRule()},
                                                                    min_group_size=1),
                     site_facts=SiteFacts(site="plant-berlin"), query_id=str(query.uuid))


def _post(client: Client, node: Any, credential: str, query_id: str, body: bytes | str) -> Any:
    return client.post(f"/agent/v1/nodes/{node.uuid}/queries/{query_id}/result", body,
                       content_type="application/json", headers={"Authorization": f"Bearer {credential}"})


def test_it_offers_a_query_in_every_sync_until_the_answer_is_stored_once(
    client: Client, estate: Estate, admin_user: Any
) -> None:
    query = create(admin_user, [estate.berlin])
    for _ in range(2):
        offered = _sync(client, estate.berlin_node, estate.berlin_credential)["queries"]
        assert [q["query_id"] for q in offered] == [str(query.uuid)] and offered[0]["spec"] == query.spec
    assert _sync(client, estate.ohio_node, estate.ohio_credential)["queries"] == []
    body = _answer(estate, query).model_dump_json()
    first = _post(client, estate.berlin_node, estate.berlin_credential, str(query.uuid), body)
    again = _post(client, estate.berlin_node, estate.berlin_credential, str(query.uuid), body)
    assert (first.status_code, first.json()) == (201, {"stored": True, "state": "answered"})
    assert (again.status_code, again.json()) == (200, {"stored": False, "state": "answered"})
    assert AuditEvent.objects.filter(action="query.site_answered").count() == 1
    assert _sync(client, estate.berlin_node, estate.berlin_credential)["queries"] == []
    query.refresh_from_db()
    assert query.state == "complete"


def test_it_refuses_an_answer_from_a_node_the_query_was_not_sent_to(
    client: Client, estate: Estate, admin_user: Any
) -> None:
    query = create(admin_user, [estate.berlin])
    body = _answer(estate, query).model_dump_json()
    # Ohio's own URL with Ohio's credential: the query is not Ohio's to answer.
    assert _post(client, estate.ohio_node, estate.ohio_credential, str(query.uuid), body).status_code == 404
    # Berlin's URL with Ohio's credential: indistinguishable from a node that does not exist.
    assert client.post(f"/agent/v1/nodes/{estate.berlin_node.uuid}/queries/{query.uuid}/result", body,
                       content_type="application/json",
                       headers={"Authorization": f"Bearer {estate.ohio_credential}"}).status_code == 404
    assert _post(client, estate.berlin_node, "ewn_forged", str(query.uuid), body).status_code == 401
    assert QuerySite.objects.get(query=query).state == "offline"


def test_it_refuses_a_malformed_or_oversized_answer_naming_what_is_wrong(
    client: Client, estate: Estate, admin_user: Any
) -> None:
    query = create(admin_user, [estate.berlin])
    bad = _post(client, estate.berlin_node, estate.berlin_credential, str(query.uuid), '{"status": "maybe"}')
    assert bad.status_code == 400 and bad.json()["field"] == "status"
    other = _answer(estate, query).model_copy(update={"query_id": "another"}).model_dump_json()
    assert _post(client, estate.berlin_node, estate.berlin_credential, str(query.uuid), other).json()["field"] \
        == "query_id"
    huge = b'{"status": "answered", "reason": "' + b"x" * (protocol.MAX_QUERY_RESULT_BYTES + 10) + b'"}'
    assert _post(client, estate.berlin_node, estate.berlin_credential, str(query.uuid), huge).status_code == 413
    assert QuerySite.objects.get(query=query).state == "offline"


def test_it_does_not_merge_an_answer_to_another_document(client: Client, estate: Estate, admin_user: Any) -> None:
    query = create(admin_user, [estate.berlin])
    answer = _answer(estate, query).model_copy(update={"spec_digest": "0" * 64})
    assert _post(client, estate.berlin_node, estate.berlin_credential, str(query.uuid),
                 answer.model_dump_json()).status_code == 201
    row = QuerySite.objects.get(query=query)
    query.refresh_from_db()
    assert (row.state, query.state) == ("error", "failed") and "spec digest" in row.reason


def test_a_node_whose_syncs_are_quiet_gets_a_new_query_at_its_next_sync(
    client: Client, estate: Estate, admin_user: Any, django_capture_on_commit_callbacks: Any
) -> None:
    node, credential = estate.berlin_node, estate.berlin_credential
    detail = node.actual_state.get("detail", {})
    applied = {"applied_generation": 0, "applied_epoch": ""}

    def sync() -> dict[str, Any]:
        body = protocol.SyncRequest(actual=protocol.ActualState(**applied, detail=detail))
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post(f"/agent/v1/nodes/{node.uuid}/sync", body.model_dump_json(),
                                   content_type="application/json", headers={"Authorization": f"Bearer {credential}"})
        assert response.status_code == 200, response.content
        answer = response.json()
        if answer["desired"]:
            signed = protocol.SignedDesiredState.model_validate(answer["desired"])
            state = signing.verify_desired_state(signed, signing.public_key_from_b64(keys.public_key_b64()))
            applied.update(applied_generation=state.generation, applied_epoch=state.epoch)
        return answer

    sync()
    sync()  # reports the state applied: the snapshot is taken
    with CaptureQueriesContext(connection) as quiet_sync:
        assert sync()["queries"] == []
    assert quiet_sync.captured_queries == []  # answered from Redis
    with django_capture_on_commit_callbacks(execute=True):
        query = create(admin_user, [estate.berlin])
    for _ in range(2):  # every sync until it is answered, each in full (no digest for a brief sync)
        answer = sync()
        assert [q["query_id"] for q in answer["queries"]] == [str(query.uuid)] and answer["report_digest"] is None

"""Creating a query: the document is checked against the target sites' catalogs, naming the field; the catalog
is kept from the nodes' reports; nothing half-made."""

from __future__ import annotations

from typing import Any

import pytest

from audit.models import AuditEvent
from audit.services import Actor
from queries.models import DatasetSchema, FederatedQuery, QueryEvent, QuerySite
from queries.services import QueriesError, QueryForbidden
from queries.services.catalog import dataset_catalog_report
from queries.services.lifecycle import query_deliveries
from sites.models import Site
from tests.models_registry.helpers import make_node
from tests.queries.conftest import Estate
from tests.queries.helpers import SPEC, create, plant_frame, register_catalog, write_dataset


def _nothing_created() -> None:
    assert not FederatedQuery.objects.exists()
    assert not QuerySite.objects.exists() and not QueryEvent.objects.exists()
    assert not AuditEvent.objects.filter(action="query.create").exists()


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"dataset": "payroll"}, "dataset", "unknown dataset 'payroll'"),
        ({"group_by": ["shift"]}, "group_by.0", "unknown column 'shift'"),
        ({"aggregates": [{"op": "mean", "column": "line"}]}, "aggregates.0.op", "'mean' needs a numeric column"),
        ({"filters": [{"column": "temperature", "op": "gt", "value": "hot"}]}, "filters.0.value",
         "'hot' is not a valid value for float column 'temperature'"),
        ({"filters": [{"column": "ts", "op": "ge", "value": "yesterday"}]}, "filters.0.value",
         "is not an ISO 8601 timestamp"),
        ({"time_bucket": {"column": "temperature", "interval": "hour"}}, "time_bucket.column", "not a timestamp"),
        # Injection attempts never get past the document's structure.
        ({"group_by": ["line) OR 1=1 --"]}, "group_by.0", "is not a plain name"),
        ({"filters": [{"column": "__import__('os').system('id')", "op": "eq", "value": 1}]}, "filters.0.column",
         "is not a plain name"),
        ({"aggregates": [{"op": "count; DROP TABLE readings"}]}, "aggregates.0.op", "is not one of"),
        ({"sql": "SELECT * FROM readings"}, "sql", "unknown field"),
        ({"filters": [{"column": "line", "op": "eq", "value": "L1\x00"}]}, "filters.0.value",
         "control characters"),
    ],
)
def test_it_refuses_a_bad_document_naming_the_field_and_creates_nothing(
    estate: Estate, admin_user: Any, change: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(QueriesError) as caught:
        create(admin_user, [estate.berlin, estate.ohio], {**SPEC, **change})
    assert caught.value.field == field
    assert message in caught.value.message and caught.value.message.startswith(field)
    _nothing_created()


def test_it_takes_a_quoted_string_as_a_literal_value(estate: Estate, admin_user: Any) -> None:
    query = create(admin_user, [estate.berlin], {**SPEC, "filters": [
        {"column": "line", "op": "eq", "value": "L1' OR '1'='1"}]})
    assert query.spec["filters"][0]["value"] == "L1' OR '1'='1"


def test_it_names_the_site_that_lacks_the_dataset(estate: Estate, admin_user: Any, region_us: Any) -> None:
    from tests.fixtures.personas import make_site

    empty = make_site(region_us, "store-9")
    make_node(empty, "pos-1", role="device")
    with pytest.raises(QueriesError) as caught:
        create(admin_user, [estate.berlin, empty])
    assert caught.value.field == "sites" and "'store-9'" in caught.value.message
    _nothing_created()


def test_it_refuses_a_site_the_user_may_not_query(estate: Estate, operator: Any, viewer: Any) -> None:
    with pytest.raises(QueryForbidden, match="'plant-ohio'"):
        create(operator, [estate.berlin, estate.ohio])
    with pytest.raises(QueryForbidden, match="'plant-berlin'"):
        create(viewer, [estate.berlin])
    _nothing_created()
    assert create(operator, [estate.berlin]).sites.count() == 1


def test_it_creates_a_query_with_a_site_row_per_target_and_delivers_it_once_marked_sent(
    estate: Estate, admin_user: Any
) -> None:
    query = create(admin_user, [estate.berlin, estate.ohio])
    rows = {r.site.slug: r for r in query.sites.select_related("site")}
    # make_node's nodes have never synced: they count as offline, waiting under the default behaviour.
    assert {r.state for r in rows.values()} == {"offline"}
    assert rows["plant-berlin"].deadline == query.wait_until
    delivered = query_deliveries(node=estate.berlin_node)
    assert [(q.query_id, q.spec) for q in delivered] == [(str(query.uuid), query.spec)]
    rows["plant-berlin"].refresh_from_db()
    query.refresh_from_db()
    assert (rows["plant-berlin"].state, query.state) == ("sent", "running")
    # Offered again on the next sync (the node runs each id once), without another transition.
    assert len(query_deliveries(node=estate.berlin_node)) == 1
    assert query.events.filter(to_state="sent").count() == 1
    audit = AuditEvent.objects.get(action="query.create")
    assert audit.actor == "admin" and [s["site"] for s in audit.after["sites"]] == ["plant-berlin", "plant-ohio"]


def test_it_keeps_the_catalog_from_reports_and_audits_shape_changes_not_row_counts(
    site_berlin: Site, tmp_path: Any
) -> None:
    node, _ = make_node(site_berlin, "gw-1")
    entries = [write_dataset(tmp_path, plant_frame(1, rows=200), "csv")]
    register_catalog(node, tmp_path, entries)
    row = DatasetSchema.objects.get(node=node)
    assert (row.name, row.kind, row.row_count) == ("readings", "csv", 200)
    assert {c["name"]: c["type"] for c in row.columns} == {"line": "string", "machine": "string", "ts": "timestamp",
                                                          "temperature": "float", "parts": "int", "defect": "bool"}
    assert AuditEvent.objects.filter(action="node.datasets").count() == 1
    write_dataset(tmp_path, plant_frame(1, rows=300), "csv")
    register_catalog(node, tmp_path, entries)
    assert DatasetSchema.objects.get(node=node).row_count == 300
    assert AuditEvent.objects.filter(action="node.datasets").count() == 1
    (tmp_path / "readings.csv").unlink()
    register_catalog(node, tmp_path, entries)
    assert "does not exist" in DatasetSchema.objects.get(node=node).error
    assert AuditEvent.objects.filter(action="node.datasets").count() == 2
    assert dataset_catalog_report(node=node, report=node.actual_state["detail"]["datasets"],
                                  actor=Actor.node(node)) is False


def test_an_air_gapped_site_waits_for_its_bundle_however_recently_it_was_heard_from(estate: Estate,
                                                                                     admin_user: Any) -> None:
    from django.utils import timezone

    from sites.models import Node

    Site.objects.filter(pk=estate.berlin.pk).update(connectivity="air_gapped")
    # Berlin's bundle out was imported a moment ago: its node looks online, yet it answers only by bundle.
    Node.objects.filter(pk__in=[estate.berlin_node.pk, estate.ohio_node.pk]).update(last_seen_at=timezone.now())
    query = create(admin_user, [Site.objects.get(pk=estate.berlin.pk), estate.ohio], deadline_s=60,
                   wait_s=30 * 86_400)
    rows = {row.site.slug: row for row in QuerySite.objects.filter(query=query).select_related("site")}
    assert (rows["plant-berlin"].state, rows["plant-berlin"].deadline) == ("bundle", query.wait_until)
    assert (rows["plant-ohio"].state, rows["plant-ohio"].deadline) == ("pending", query.deadline)
    assert (query.wait_until - query.deadline).days == 29  # a month for the bundle's round trip
    [delivered] = query_deliveries(node=estate.berlin_node)  # what the next bundle in carries
    assert (delivered.query_id, delivered.deadline) == (str(query.uuid), query.wait_until)


@pytest.mark.parametrize(("field", "value", "most"), [("wait_s", 90 * 86_400 + 1, 90 * 86_400),
                                                      ("deadline_s", 7 * 86_400 + 1, 7 * 86_400),
                                                      ("wait_s", 0, 90 * 86_400)])
def test_it_refuses_a_wait_or_deadline_out_of_range_naming_the_field(estate: Estate, admin_user: Any, field: str,
                                                                     value: int, most: int) -> None:
    with pytest.raises(QueriesError) as caught:
        create(admin_user, [estate.berlin], **{field: value})
    assert caught.value.field == field
    assert caught.value.message == f"{field}: must be between 1 and {most} seconds"
    _nothing_created()

"""The query console: who may do what, the form, the live page, the merged table and its CSV."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from audit.services import Actor
from policies.permissions import role_grant
from queries.models import FederatedQuery
from tests.fixtures.personas import PASSWORD
from tests.queries.conftest import Estate
from tests.queries.helpers import SPEC, answer_locally, create

PERSONAS = ("admin_user", "operator", "viewer", "stranger", "anonymous")


def as_persona(client: Client, request: pytest.FixtureRequest, persona: str) -> Any:
    if persona == "anonymous":
        return None
    user = request.getfixturevalue(persona)
    client.login(username=user.username, password=PASSWORD)
    return user


def _post_query(client: Client, sites: list[str], **fields: Any) -> Any:
    import json

    data = {"dataset": "readings", "sites": sites, "spec": json.dumps(SPEC), "offline_behaviour": "wait",
            "deadline_s": "60", "wait_hours": "1", **fields}
    return client.post(reverse("queries:query-new"), data)


def _nodes(estate: Estate) -> dict[str, Any]:
    return {"plant-berlin": (estate.berlin_node, estate.folders["plant-berlin"], estate.entries["plant-berlin"]),
            "plant-ohio": (estate.ohio_node, estate.folders["plant-ohio"], estate.entries["plant-ohio"])}


@pytest.mark.parametrize(
    ("persona", "listing", "post", "foreign_detail"),
    [
        ("admin_user", 200, 302, 200),
        ("operator", 200, 302, 404),
        ("viewer", 403, 403, 404),
        ("stranger", 403, 403, 404),
        ("anonymous", 302, 302, 302),
    ],
)
def test_it_answers_each_persona_with_the_right_status(
    client: Client, request: pytest.FixtureRequest, estate: Estate, admin_user: Any, persona: str, listing: int,
    post: int, foreign_detail: int,
) -> None:
    someone_elses = create(admin_user, [estate.berlin, estate.ohio])
    client.logout()
    as_persona(client, request, persona)
    assert client.get(reverse("queries:query-list")).status_code == listing
    assert client.get(reverse("queries:query-new")).status_code == listing
    before = FederatedQuery.objects.count()
    response = _post_query(client, ["plant-berlin"])
    assert response.status_code == post
    assert FederatedQuery.objects.count() == before + (1 if post == 302 and persona != "anonymous" else 0)
    for name in ("queries:query-detail", "queries:query-csv"):
        status = client.get(reverse(name, args=[someone_elses.uuid])).status_code
        expected = 404 if name == "queries:query-csv" and foreign_detail == 200 else foreign_detail  # no result yet
        assert status == expected, name


def test_it_answers_404_for_an_invisible_site_and_403_for_one_visible_but_not_queryable(
    client: Client, estate: Estate, operator: Any
) -> None:
    client.login(username="operator", password=PASSWORD)
    assert _post_query(client, ["plant-berlin", "plant-ohio"]).status_code == 404
    role_grant(actor=Actor.system("test"), principal=operator, role="Viewer", obj=estate.ohio)
    assert _post_query(client, ["plant-berlin", "plant-ohio"]).status_code == 403
    assert _post_query(client, ["plant-atlantis"]).status_code == 404
    assert not FederatedQuery.objects.exists()


def test_it_offers_the_catalog_of_the_queryable_sites_only(client: Client, estate: Estate, operator: Any) -> None:
    client.login(username="operator", password=PASSWORD)
    page = client.get(reverse("queries:query-new")).content.decode()
    assert "readings" in page and 'value="plant-berlin"' in page and "plant-ohio" not in page
    assert "temperature" in page and "3000" in page


def test_it_builds_the_document_from_the_form_fields(client: Client, estate: Estate, admin_user: Any) -> None:
    client.login(username="admin", password=PASSWORD)
    response = _post_query(client, ["plant-berlin", "plant-ohio"], spec="", group_by=["line"],
                           bucket_column="ts", bucket_interval="day", agg_op_1="count", agg_op_2="mean",
                           agg_column_2="temperature", agg_op_3="quantile", agg_column_3="temperature", agg_q_3="0.9",
                           filter_column_1="line", filter_op_1="in", filter_value_1="L1, L2",
                           filter_column_2="parts", filter_op_2="ge", filter_value_2="3",
                           offline_behaviour="timeout", deadline_s="30")
    assert response.status_code == 302, response.content.decode()[-2000:]
    query = FederatedQuery.objects.get()
    assert query.spec["filters"] == [{"column": "line", "op": "in", "value": ["L1", "L2"]},
                                     {"column": "parts", "op": "ge", "value": 3}]
    assert query.spec["group_by"] == ["line"] and query.spec["time_bucket"]["interval"] == "day"
    assert [(a["op"], a["column"], a["q"]) for a in query.spec["aggregates"]] == [
        ("count", None, None), ("mean", "temperature", None), ("quantile", "temperature", 0.9)]
    assert query.offline_behaviour == "timeout" and response["Location"].endswith(f"/queries/{query.uuid}/")


def test_it_shows_a_bad_field_and_creates_nothing(client: Client, estate: Estate, admin_user: Any) -> None:
    client.login(username="admin", password=PASSWORD)
    response = _post_query(client, ["plant-berlin"], spec="", filter_column_1="temperature", filter_op_1="gt",
                           filter_value_1="hot", agg_op_1="count")
    assert response.status_code == 422 and "&#x27;hot&#x27; is not a number" in response.content.decode()
    response = _post_query(client, ["plant-berlin"], spec='{"dataset": "readings", "group_by": ["x; drop"], '
                                                          '"aggregates": [{"op": "count"}]}')
    assert response.status_code == 422 and "group_by.0" in response.content.decode()
    assert not FederatedQuery.objects.exists()


def test_it_follows_the_sites_live_until_the_query_is_final(client: Client, estate: Estate, admin_user: Any) -> None:
    client.login(username="admin", password=PASSWORD)
    query = create(admin_user, [estate.berlin, estate.ohio])
    url = reverse("queries:query-detail", args=[query.uuid])
    live = client.get(url, headers={"HX-Request": "true"}).content.decode()
    assert live.strip().startswith('<div id="query-live"') and 'hx-trigger="every 2s"' in live and "<html" not in live
    assert live.count('data-state="offline"') == 2
    answer_locally(query, _nodes(estate))
    live = client.get(url, headers={"HX-Request": "true"}).content.decode()
    assert "hx-trigger" not in live and 'data-state="complete"' in live and "<svg" in live


def _table(page: str) -> list[list[str]]:
    body = page.split('id="result-table"')[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>")[1], re.S)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)[:-1] for row in rows]  # less the "Sites" column


def test_it_downloads_the_merged_table_as_csv(client: Client, estate: Estate, admin_user: Any) -> None:
    client.login(username="admin", password=PASSWORD)
    query = create(admin_user, [estate.berlin, estate.ohio])
    answer_locally(query, _nodes(estate))
    page = client.get(reverse("queries:query-detail", args=[query.uuid])).content.decode()
    response = client.get(reverse("queries:query-csv", args=[query.uuid]))
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    merged = FederatedQuery.objects.get().merged()
    assert rows[0] == merged["columns"]
    table = _table(page)
    assert len(rows) - 1 == len(table) == len(merged["rows"]) > 0
    for csv_row, table_row, merged_row in zip(rows[1:], table, merged["rows"], strict=True):
        for text, cell, value in zip(csv_row, table_row, merged_row, strict=True):
            if isinstance(value, float):
                assert float(text) == value and float(cell) == pytest.approx(value, rel=1e-5)
            else:
                assert text == cell == str(value)


def test_it_draws_a_line_per_series_over_time_buckets(client: Client, estate: Estate, admin_user: Any) -> None:
    client.login(username="admin", password=PASSWORD)
    query = create(admin_user, [estate.berlin, estate.ohio], {
        "dataset": "readings", "group_by": ["line"], "time_bucket": {"column": "ts", "interval": "day"},
        "aggregates": [{"op": "mean", "column": "temperature"}]})
    answer_locally(query, _nodes(estate))
    page = client.get(reverse("queries:query-detail", args=[query.uuid])).content.decode()
    # Lines L1, L2 (both sites) and L4: one polyline each, over the week's days.
    assert page.count("<polyline") == 3 and "mean_temperature" in page

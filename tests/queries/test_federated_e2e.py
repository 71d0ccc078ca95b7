"""Federated queries end to end: real control plane, real edge runtime processes with their own data files."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from django.utils import timezone

from audit.models import AuditEvent
from edge_runtime.audit import NodeAudit
from queries.models import DatasetSchema, FederatedQuery, QuerySite
from queries.services.lifecycle import query_expire
from sites.models import Site
from tests.fixtures.processes import ControlPlane, EdgeNode, wait_until
from tests.queries.helpers import (
    OPEN_POLICY,
    create,
    data_policy,
    pandas_reference,
    plant_frame,
    write_dataset,
    write_datasets_file,
)

pytestmark = pytest.mark.process


def _node_with_data(edge_node: Any, site: Site, name: str, frame: pd.DataFrame, kind: str) -> EdgeNode:
    node = edge_node(site, name, role="gateway", start=False)
    write_datasets_file(node.state_dir, [write_dataset(node.state_dir, frame, kind)])
    node.start()
    wait_until(lambda: DatasetSchema.objects.filter(node__name=name, name="readings", error="").exists(),
               timeout=30, what=f"{name} to report its catalog")
    return node


def _final(query: FederatedQuery, timeout: float = 30) -> FederatedQuery:
    def done() -> FederatedQuery | None:
        query.refresh_from_db()
        return query if query.is_final else None

    return wait_until(done, timeout=timeout, what=f"query {query.uuid} to finish")


def _merged_frame(query: FederatedQuery) -> pd.DataFrame:
    merged = query.merged()
    assert merged is not None
    return pd.DataFrame(merged["rows"], columns=merged["columns"]).sort_values(["line", "machine"]) \
        .reset_index(drop=True)


def _assert_equal(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    expected = expected.sort_values(["line", "machine"]).reset_index(drop=True)
    assert list(got["line"]) == list(expected["line"]) and list(got["machine"]) == list(expected["machine"])
    assert list(got["count"]) == list(expected["count"])
    assert list(got["sum_parts"]) == list(expected["sum_parts"])
    for column in ("mean_temperature", "std_temperature", "min_temperature", "max_temperature"):
        np.testing.assert_allclose(got[column].to_numpy(float), expected[column].to_numpy(float), rtol=1e-9)


def _node_events(node: EdgeNode, query: FederatedQuery) -> list[dict[str, Any]]:
    events = NodeAudit.in_state_dir(node.state_dir).events_after(0)
    return [e.as_dict() for e in events if e.detail.get("query_id") == str(query.uuid)]


def test_it_merges_the_answers_of_two_real_sites_into_what_pandas_computes_over_their_union(
    live_control_plane: ControlPlane, edge_node: Any, site_berlin: Site, site_ohio: Site, admin_user: Any
) -> None:
    data_policy(OPEN_POLICY)
    # Line L2 runs at both plants: its groups merge partials from two sites.
    berlin_data, ohio_data = plant_frame(1), plant_frame(2, lines=("L2", "L3"))
    berlin = _node_with_data(edge_node, site_berlin, "gw-berlin", berlin_data, "parquet")
    _node_with_data(edge_node, site_ohio, "gw-ohio", ohio_data, "csv")

    query = _final(create(admin_user, [site_berlin, site_ohio]))

    assert query.state == "complete"
    assert {row.state for row in QuerySite.objects.filter(query=query)} == {"answered"}
    _assert_equal(_merged_frame(query), pandas_reference([berlin_data, ohio_data]))
    assert query.merged()["contributors"].count(2) == 3  # L2 x M1..M3 came from both sites
    # Every step is in the control plane's audit trail and the node's own chain.
    actions = list(AuditEvent.objects.filter(object_id=str(query.uuid)).order_by("seq")
                   .values_list("action", flat=True))
    assert actions.count("query.create") == 1 and actions.count("query.site_answered") == 2
    assert actions[-1] == "query.finish"
    node_actions = [e["action"] for e in _node_events(berlin, query)]
    assert node_actions == ["query.received", "query.answered"]


def test_it_reports_a_refusal_with_the_rule_while_the_other_site_answers(
    live_control_plane: ControlPlane, edge_node: Any, site_berlin: Site, site_ohio: Site, admin_user: Any
) -> None:
    data_policy({**OPEN_POLICY, "rules": [{
        "name": "ohio-keeps-temperatures", "where": {"sites": ["plant-ohio"]},
        "policy": {"datasets": {"readings": {"columns": ["line", "machine", "parts"]}}, "min_group_size": 1}}]})
    berlin_data = plant_frame(3)
    _node_with_data(edge_node, site_berlin, "gw-berlin", berlin_data, "sqlite")
    ohio = _node_with_data(edge_node, site_ohio, "gw-ohio", plant_frame(4), "parquet")

    query = _final(create(admin_user, [site_berlin, site_ohio]))

    assert query.state == "partial"
    refused = QuerySite.objects.get(query=query, site=site_ohio)
    assert (refused.state, refused.rule, refused.field) == ("refused", "columns", "aggregates")
    assert "'temperature'" in refused.reason
    assert QuerySite.objects.get(query=query, site=site_berlin).state == "answered"
    _assert_equal(_merged_frame(query), pandas_reference([berlin_data]))
    audit = AuditEvent.objects.get(action="query.site_refused", object_id=str(query.uuid))
    assert audit.site_uuid == site_ohio.uuid and audit.after["rule"] == "columns"
    decision = _node_events(ohio, query)[-1]
    assert decision["action"] == "query.refused" and decision["detail"]["rule"] == "columns"


def _offline(node: EdgeNode, name: str) -> None:
    node.stop()
    from sites.liveness import node_status
    from sites.models import Node

    def stale() -> bool:
        n = Node.objects.get(name=name)
        return node_status(last_seen_at=n.last_seen_at, revoked=False, now=timezone.now()) != "online"

    wait_until(stale, timeout=15, what=f"{name} to be seen offline")


def test_it_waits_for_a_site_that_was_offline_and_takes_its_answer_when_it_comes_back(
    live_control_plane: ControlPlane, edge_node: Any, site_berlin: Site, admin_user: Any
) -> None:
    data_policy(OPEN_POLICY)
    data = plant_frame(5)
    node = _node_with_data(edge_node, site_berlin, "gw-berlin", data, "csv")
    _offline(node, "gw-berlin")

    query = create(admin_user, [site_berlin], offline_behaviour="wait", deadline_s=2, wait_s=600)
    assert QuerySite.objects.get(query=query).state == "offline"
    # Past the answer deadline of online sites: an offline site under "wait" is not held to it.
    wait_until(lambda: timezone.now() > query.deadline, timeout=10, what="the answer deadline to pass")
    assert query_expire() == 0
    node.start()

    query = _final(query)
    assert query.state == "complete"
    _assert_equal(_merged_frame(query), pandas_reference([data]))
    events = list(query.events.filter(site=site_berlin).values_list("to_state", flat=True))
    assert events == ["offline", "sent", "answered"]


def test_it_reports_an_offline_site_as_timed_out_at_the_deadline_when_the_query_says_so(
    live_control_plane: ControlPlane, edge_node: Any, site_berlin: Site, admin_user: Any
) -> None:
    data_policy(OPEN_POLICY)
    node = _node_with_data(edge_node, site_berlin, "gw-berlin", plant_frame(6), "parquet")
    _offline(node, "gw-berlin")

    query = create(admin_user, [site_berlin], offline_behaviour="timeout", deadline_s=2)
    assert query_expire() == 0  # not before the deadline
    wait_until(lambda: query_expire() == 1, timeout=10, what="the deadline to pass")
    assert query_expire() == 0  # safe to run twice
    query.refresh_from_db()
    row = QuerySite.objects.get(query=query)
    assert (query.state, row.state) == ("failed", "timed_out")
    assert "offline" in row.reason
    assert AuditEvent.objects.filter(action="query.site_timed_out", site_uuid=site_berlin.uuid).count() == 1
    # Coming back later changes nothing: the query is closed and no longer offered.
    node.start()
    wait_until(lambda: "sync ok" in node.log_text(), timeout=15, what="the node to sync again")
    row.refresh_from_db()
    assert row.state == "timed_out"


def test_it_refuses_to_start_a_node_whose_datasets_file_is_wrong_naming_the_entry(
    live_control_plane: ControlPlane, edge_node: Any, site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-berlin", start=False)
    bad = write_datasets_file(node.state_dir / "conf", [{"name": "readings", "kind": "excel", "path": "r.xlsx"}])
    result = node.cli("run", "--state-dir", str(node.state_dir), "--serve-port", "-1", "--datasets", str(bad),
                      check=False, timeout=30)
    assert result.returncode == 1
    assert "dataset 'readings' field 'kind'" in result.stderr
    missing = node.cli("run", "--state-dir", str(node.state_dir), "--serve-port", "-1", "--datasets",
                       str(node.state_dir / "nope.json"), check=False, timeout=30)
    assert missing.returncode == 1 and "does not exist" in missing.stderr

"""An air-gapped node end to end, both ways: a model, a policy change and a query in by bundle; its audit entries,
telemetry, catalog and answer back by bundle; receipts close the loop; nothing lost, nothing twice."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from audit.log_models import NodeLog, NodeLogEntry
from audit.services import Actor
from edge_runtime.airgap.bundle import BundleRefused, read_metadata
from edge_runtime.audit import NodeAudit
from models_registry import services as registry
from queries.models import DatasetSchema, FederatedQuery, QuerySite
from sites import services
from sites.bundles import bundle_export
from sites.bundles_out import bundle_import
from sites.models import Node, Region, Site, SiteBundle
from sites.telemetry.models import TelemetryStream
from tests.e2e.test_airgap import model_version
from tests.fixtures.personas import make_site
from tests.fixtures.processes import EdgeNode, wait_until
from tests.models_registry import onnx_factory
from tests.models_registry.helpers import make_model, valid_version
from tests.queries.helpers import (
    OPEN_POLICY,
    SPEC,
    create,
    data_policy,
    pandas_reference,
    plant_frame,
    write_dataset,
    write_datasets_file,
)

pytestmark = [pytest.mark.process, pytest.mark.django_db(transaction=True)]

ACTOR = Actor.system("test")


@pytest.fixture
def site_base9(region_eu: Region) -> Site:
    return make_site(region_eu, "base-9", name="Base 9", jurisdiction="DE", connectivity="air_gapped")


def carry_in(site: Site, node: EdgeNode, tmp_path: Path, name: str) -> int:
    """Make the site's next bundle in and drop it where the technician copies it; the sequence applied."""
    path = tmp_path / name
    made = bundle_export(actor=ACTOR, site=site, path=path)
    drop = tmp_path / f"{node.name}-drop"
    drop.mkdir(exist_ok=True)
    shutil.copy(path, drop / name)
    sequence = made.bundle.sequence
    wait_until(lambda: node.status()["bundles"]["applied_sequence"] == sequence, timeout=60,
               what=f"bundle {sequence} to be applied\n{node.log_text()}")
    return sequence


def carry_out(node: EdgeNode, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    node.cli("export-bundle", str(path), "--state-dir", str(node.state_dir))
    return path


def stored_entries(node: Node) -> list[int]:
    return list(NodeLogEntry.objects.filter(node_uuid=node.uuid).order_by("seq").values_list("seq", flat=True))


def test_an_air_gapped_node_exchanges_everything_by_bundle_and_nothing_is_lost_or_taken_twice(
    edge_node: Callable[..., EdgeNode], site_base9: Site, admin_user: Any, tmp_path: Path
) -> None:
    data_policy(OPEN_POLICY)
    frame = plant_frame(7)
    # Enrolled at the depot, then run with no route to the control plane: bundles in its drop folder only.
    node = edge_node(site_base9, "b9-1", role="gateway", start=False)
    write_datasets_file(node.state_dir, [write_dataset(node.state_dir, frame, "parquet")])
    node.args = ["--offline", "--drop-folder", str(tmp_path / "b9-1-drop"), "--telemetry-interval", "0.2"]
    node.start()
    wait_until(lambda: node.status()["model_server_url"], what=f"the node's model server\n{node.log_text()}")
    row = Node.objects.get(name="b9-1")
    url = node.status()["model_server_url"]

    # In: a model. The node serves it, never having dialled the control plane.
    model = make_model("sonar")
    registry.deployment_create(actor=ACTOR, version=valid_version(model, onnx_factory.linear(seed=3),
                                                                  version="2.0.0"), sites=[site_base9])
    assert carry_in(site_base9, node, tmp_path, "in-1.ewb") == 1
    wait_until(lambda: model_version(url, "sonar") == "2.0.0", timeout=60,
               what=f"the model from the bundle\n{node.log_text()}")
    assert node.status()["last_sync_at"] is None

    # Out: its report (the model serving, its dataset catalog), audit entries and telemetry.
    wait_until(lambda: "sonar" in (node.state_dir / "bundles" / "report.json").read_text(), timeout=20,
               what="the agent's report to name the model")
    out1 = carry_out(node, tmp_path, "out-1.ewb")
    meta = read_metadata(out1).signed
    assert meta.direction == "out" and meta.node == str(row.uuid) and meta.sequence == 1
    taken = bundle_import(actor=ACTOR, path=out1)
    assert not taken.again and taken.bundle.summary["audit"] == "ok"
    row.refresh_from_db()
    assert row.last_seen_at == meta.created  # "as of" the bundle, not of the import
    assert [m["state"] for m in row.actual_state["models"] if m["name"] == "sonar"] == ["serving"]
    assert DatasetSchema.objects.filter(node=row, name="readings", error="").exists()
    entries = stored_entries(row)
    assert entries == list(range(1, len(entries) + 1)) and len(entries) >= 5  # started, bundle imported/applied...
    items = taken.bundle.summary["telemetry_items"]
    stream = TelemetryStream.objects.get(node=row)
    assert items > 0 and stream.last_seq == taken.bundle.summary["telemetry_seq"] and stream.points == items

    # The same file again changes nothing; a bundle in is no bundle out.
    again = bundle_import(actor=ACTOR, path=out1)
    assert again.again and again.bundle.pk == taken.bundle.pk
    assert stored_entries(row) == entries and TelemetryStream.objects.get(node=row).points == items
    with pytest.raises(BundleRefused, match="bundle in for site base-9"):
        bundle_import(actor=ACTOR, path=tmp_path / "in-1.ewb")

    # A query of the air-gapped site waits for a bundle; a policy change travels with it.
    query = create(admin_user, [site_base9], spec=SPEC, wait_s=7 * 86_400)
    assert QuerySite.objects.get(query=query).state == "bundle"
    services.site_update(actor=ACTOR, site=site_base9, labels={"zone": "east"})
    assert carry_in(site_base9, node, tmp_path, "in-2.ewb") == 2
    assert QuerySite.objects.get(query=query).state == "bundle"  # carried, still waiting for its answer
    wait_until(lambda: _outbox_states(node) == ["waiting"], timeout=30,
               what=f"the node to answer the query into its outbox\n{node.log_text()}")
    assert '"zone":"east"' in json.loads((node.state_dir / "desired_state.json").read_text())["payload"]

    # The receipt of bundle out 1 came with bundle in 2: what it carried is forgotten at the node.
    status = node.status()
    assert status["telemetry"]["acked_seq"] >= taken.bundle.summary["telemetry_seq"]
    assert not list((node.state_dir / "bundles" / "outbox").glob("*.json"))
    assert NodeAudit.in_state_dir(node.state_dir).witness().stored == len(entries)

    # Out again: only what is new, and the answer; the merge is exact.
    out2 = carry_out(node, tmp_path, "out-2.ewb")
    second = bundle_import(actor=ACTOR, path=out2)
    assert second.bundle.summary["answers"] == 1
    assert second.bundle.summary["audit_entries"] == len(stored_entries(row)) - len(entries)
    log = NodeLog.objects.get(node_uuid=row.uuid)
    node_size = NodeAudit.in_state_dir(node.state_dir).size()
    assert stored_entries(row) == list(range(1, log.stored + 1)) and log.stored <= node_size
    assert log.cosigned_size == log.stored
    query.refresh_from_db()
    assert query.state == "complete" and QuerySite.objects.get(query=query).state == "answered"
    _assert_merged(query, frame)
    stream = TelemetryStream.objects.get(node=row)
    assert stream.points == stream.last_seq and stream.lost == 0  # every point once, none missing

    # The older bundle out is refused now; bundle in 3 carries the receipt, and the answer leaves the outbox.
    with pytest.raises(BundleRefused, match="older than bundle 2"):
        bundle_import(actor=ACTOR, path=out1)
    assert carry_in(site_base9, node, tmp_path, "in-3.ewb") == 3
    wait_until(lambda: _outbox_states(node) == ["delivered"], timeout=20, what="the answer to be acknowledged")
    assert SiteBundle.objects.filter(site=site_base9, direction="out").count() == 2
    assert model_version(url, "sonar") == "2.0.0"


def _outbox_states(node: EdgeNode) -> list[str]:
    path = node.state_dir / "queries.sqlite3"
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT state FROM queries")]


def _assert_merged(query: FederatedQuery, frame: pd.DataFrame) -> None:
    merged = query.merged()
    assert merged is not None
    got = pd.DataFrame(merged["rows"], columns=merged["columns"]).sort_values(["line", "machine"]) \
        .reset_index(drop=True)
    expected = pandas_reference([frame]).sort_values(["line", "machine"]).reset_index(drop=True)
    assert list(got["count"]) == list(expected["count"]) and list(got["sum_parts"]) == list(expected["sum_parts"])
    assert got["mean_temperature"].round(9).tolist() == expected["mean_temperature"].round(9).tolist()

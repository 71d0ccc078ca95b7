"""The node's query service against the real control plane: answers survive an outage and a restart, and a
query id runs at most once, also across restarts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from audit.models import AuditEvent
from edge_runtime import protocol
from edge_runtime.audit import NodeAudit
from edge_runtime.data.catalog import Catalog
from edge_runtime.datasets import OUTBOX_FILE, DatasetService, Outbox
from edge_runtime.state import StateDir
from orchestrator.models import DesiredState
from queries.models import QuerySite
from sites.models import Node, Site
from tests.fixtures.processes import ControlPlane
from tests.queries.helpers import OPEN_POLICY, create, data_policy, plant_frame, register_catalog, write_dataset

pytestmark = pytest.mark.process


def _service(state_dir: Any, entries: list[dict[str, Any]]) -> DatasetService:
    identity = StateDir(state_dir).load_identity()
    return DatasetService(state_dir=state_dir, catalog=Catalog.from_config({"datasets": entries}, base_dir=state_dir),
                        audit=NodeAudit.in_state_dir(state_dir), base_url=identity.url, node_id=identity.node_id,
                        credential=identity.credential, site=identity.site)


async def _until(predicate: Any, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _received(state_dir: Any, query_id: str) -> int:
    events = NodeAudit.in_state_dir(state_dir).events_after(0)
    return sum(1 for e in events if e.action == "query.received" and e.detail.get("query_id") == query_id)


def test_it_delivers_an_answer_made_during_an_outage_once_and_never_runs_a_query_twice(
    live_control_plane: ControlPlane, edge_node: Any, site_berlin: Site, admin_user: Any
) -> None:
    data_policy(OPEN_POLICY)
    node = edge_node(site_berlin, "gw-1", start=False)
    entries = [write_dataset(node.state_dir, plant_frame(7), "parquet")]
    db_node = Node.objects.get(name="gw-1")
    register_catalog(db_node, node.state_dir, entries)
    desired = protocol.DesiredState.model_validate_json(DesiredState.objects.get(node=db_node).payload)
    query, interrupted = create(admin_user, [site_berlin]), create(admin_user, [site_berlin])
    request = protocol.QueryRequest(query_id=str(query.uuid), spec=query.spec)
    outbox = Outbox(node.state_dir / OUTBOX_FILE)

    async def during_the_outage() -> None:
        service = _service(node.state_dir, entries)
        await service.reconcile(desired)
        live_control_plane.stop()
        service.queries_received([request])
        await _until(lambda: outbox.state(request.query_id) == "waiting")
        assert not await service.flush()  # the control plane is down: the answer stays
        await service.aclose()

    asyncio.run(during_the_outage())
    assert QuerySite.objects.get(query=query).state == "offline"
    live_control_plane.start()
    # A node that crashed while running a query: its id is taken, its answer never came.
    assert outbox.take(str(interrupted.uuid))

    async def after_a_restart() -> None:
        service = _service(node.state_dir, entries)
        await service.reconcile(desired)
        # The sync answer offers both again; neither runs (again).
        service.queries_received([request, protocol.QueryRequest(query_id=str(interrupted.uuid),
                                                                 spec=interrupted.spec)])
        await _until(lambda: outbox.state(request.query_id) == outbox.state(str(interrupted.uuid)) == "delivered")
        await service.aclose()

    asyncio.run(after_a_restart())
    row = QuerySite.objects.get(query=query)
    assert row.state == "answered" and row.rows_scanned == 3000
    assert AuditEvent.objects.filter(action="query.site_answered", object_id=str(query.uuid)).count() == 1
    assert _received(node.state_dir, str(query.uuid)) == 1
    crashed = QuerySite.objects.get(query=interrupted)
    assert crashed.state == "error" and "not run twice" in crashed.reason
    assert _received(node.state_dir, str(interrupted.uuid)) == 0

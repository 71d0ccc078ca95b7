"""A real edge runtime against a real control plane: once settled its syncs are brief and answered from Redis,
a change still reaches it at once, and PostgreSQL still learns when it was heard."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable

import httpx
import pytest
from django.utils import timezone

from audit.services import Actor
from metrics import counters
from orchestrator.models import DesiredState
from sites import services
from sites.models import Node, NodeStatus, Site
from tests.fixtures.processes import ControlPlane, EdgeNode, wait_until
from tests.sites.test_quiet_sync import SimNode

pytestmark = [pytest.mark.process, pytest.mark.django_db(transaction=True)]


def quiet_syncs() -> float:
    return counters.counters_read()[counters.SYNC].get("path:quiet", 0)


def test_a_settled_node_syncs_quietly_and_still_gets_a_change_at_once(edge_node: Callable[..., EdgeNode],
                                                                       site_berlin: Site) -> None:
    node = edge_node(site_berlin, "gw-quiet")
    node_id = json.loads(node.state_dir.joinpath("identity.json").read_text())["node_id"]
    generation = lambda: DesiredState.objects.get(node__uuid=node_id).generation  # noqa: E731
    wait_until(lambda: node.status()["applied_generation"] == generation(), timeout=20,
               what=f"the node to apply its first desired state\n{node.log_text()}")
    before = quiet_syncs()
    wait_until(lambda: quiet_syncs() >= before + 3, timeout=20,
               what=f"three quiet syncs (1 s interval)\n{node.log_text()}")
    # PostgreSQL hears of them from the flush: the node stays online and its last sync keeps moving.
    heard = Node.objects.get(uuid=node_id).last_seen_at
    wait_until(lambda: Node.objects.get(uuid=node_id).last_seen_at > heard, timeout=10,
               what="the heartbeat flush to move last_seen_at")
    row = Node.objects.get(uuid=node_id)
    assert (timezone.now() - row.last_seen_at).total_seconds() < 4 and row.status == NodeStatus.ONLINE
    # A change of its desired state retires the snapshot and nudges it: applied within seconds.
    old = generation()
    started = time.monotonic()
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"line": "7"})
    assert generation() == old + 1
    wait_until(lambda: node.status()["applied_generation"] == old + 1, timeout=10,
               what=f"the node to apply the new desired state\n{node.log_text()}")
    assert time.monotonic() - started < 5
    wait_until(lambda: Node.objects.get(uuid=node_id).applied_generation == old + 1, timeout=10,
               what="the control plane to record the new generation applied")
    # And it goes quiet again on the new state.
    before = quiet_syncs()
    wait_until(lambda: quiet_syncs() >= before + 2, timeout=20, what=f"quiet syncs again\n{node.log_text()}")


class LiveClient:
    """The served control plane, posted to as ``django.test.Client`` posts (for ``SimNode``)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def post(self, path: str, data: str, content_type: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.http.post(path, content=data, headers={"Content-Type": content_type, **(headers or {})})


def test_the_served_application_answers_a_quiet_sync_before_django(live_control_plane: ControlPlane,
                                                                   site_berlin: Site) -> None:
    sim = SimNode(LiveClient(live_control_plane.url), lambda **_: contextlib.nullcontext(), site_berlin)  # type: ignore[arg-type]
    sim.settle()
    before = quiet_syncs()
    response = sim.post(sim.brief())
    assert response.status_code == 200 and response.headers["edgewise-sync"] == "quiet"
    assert response.json()["generation"] == sim.generation
    # Django's middleware never saw it: none of the headers it adds to every answer.
    assert "x-frame-options" not in response.headers
    assert quiet_syncs() == before + 1
    # What is not quiet reaches Django, which refuses it or asks for the report, as before.
    refused = sim.post(sim.brief(), credential="ewn_" + "x" * 40)
    assert refused.status_code == 401 and refused.headers["x-frame-options"] == "DENY"
    wanted = sim.post(sim.brief(digest="0" * 64))
    assert wanted.status_code == 200 and wanted.headers["edgewise-sync"] == "report-wanted"
    assert wanted.json()["report_wanted"] is True

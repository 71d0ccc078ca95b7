"""Publishing many nodes' desired states reads what they share once, whatever their number."""

from __future__ import annotations

import hashlib
import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from audit.models import AuditEvent
from edge_runtime import signing
from models_registry import services as registry
from orchestrator import keys
from orchestrator.desired_state import desired_state_content, desired_state_publish_many
from orchestrator.models import DesiredState
from rollouts import services as rollouts
from sites.models import Node, Site
from tests.models_registry.helpers import make_model, valid_version
from tests.rollouts.rollout_factories import ACTOR, deploy, fleet, report, serving, tick, two_versions

pytestmark = pytest.mark.django_db


def _relabel_and_publish(site: Site, label: str) -> int:
    """Change the site's labels (every node's content moves) and publish all its nodes; the statements run."""
    site.labels = {"line": label}
    site.save(update_fields=["labels"])
    nodes = list(Node.objects.filter(site=site).select_related("site").order_by("pk"))
    with CaptureQueriesContext(connection) as queries:
        published = desired_state_publish_many(nodes=nodes, actor=ACTOR)
    assert set(published) == {n.pk for n in nodes}
    return len(queries)


def _assert_content_matches_an_uncached_build(site: Site) -> None:
    trust = keys.current()
    for node in Node.objects.filter(site=site).select_related("site"):
        content = {**desired_state_content(node), "epoch": trust.epoch, "epoch_started_at": trust.epoch_started_at}
        stored = DesiredState.objects.get(node=node)
        assert stored.content_hash == hashlib.sha256(signing.canonical_json(content).encode()).hexdigest(), node.name


def test_publishing_fifty_nodes_takes_as_many_statements_as_five(site_berlin: Site) -> None:
    v1, v2 = two_versions("defects")
    nodes = fleet(site_berlin, 5)
    deploy(v1, site_berlin)
    for node in nodes:
        report(node, serving("defects", "1.0.0"))
    # A rollout under way (its canary assigned v2) and a deployment to one node only.
    rollout = rollouts.rollout_create(actor=ACTOR, user=None, version=v2, target={"sites": [site_berlin.slug]},
                                      strategy={"canary_nodes": 1, "percentages": [100], "bake_s": 0, "gate": None})
    tick(rollouts.rollout_start(actor=ACTOR, rollout=rollout))
    registry.deployment_create(actor=ACTOR, version=valid_version(make_model("counter")), nodes=[nodes[1]])

    few = _relabel_and_publish(site_berlin, "a")
    _assert_content_matches_an_uncached_build(site_berlin)
    fleet(site_berlin, 45, prefix="more")
    # Their first states are inserted together, in the one statement that updating would take; then updated.
    assert _relabel_and_publish(site_berlin, "a") == few
    many = _relabel_and_publish(site_berlin, "b")
    _assert_content_matches_an_uncached_build(site_berlin)

    assert many == few, f"5 nodes took {few} statements, 50 took {many}"
    # Each moved node is still audited on its own, in one insert.
    assert AuditEvent.objects.filter(action="desired_state.publish").count() >= 55
    payloads = {n.name: json.loads(n.desired.payload) for n in Node.objects.select_related("desired")}
    assert {m["version"] for m in payloads["n0"]["models"] if m["name"] == "defects"} == {"2.0.0"}
    assert [m["name"] for m in payloads["n1"]["models"]].count("counter") == 1
    assert all(p["labels"] == {"line": "b"} for p in payloads.values())

"""A region-scoped user sees of a rollout only the nodes and sites of their region."""

from __future__ import annotations

from typing import Any

import pytest
from django.urls import reverse

from edge_runtime.protocol import ModelStatus
from rollouts import services
from rollouts.models import Rollout, RolloutState
from rollouts.visibility import HIDDEN_NODE
from sites.models import Region, Site
from tests.fixtures.personas import make_site, make_user
from tests.models_registry import onnx_factory
from tests.models_registry.helpers import make_model, make_node, valid_version
from tests.rollouts.rollout_factories import ACTOR, deploy, fleet, report, serving, tick
from tests.rollouts.test_rollout_views import client_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def estate_rollout(site_berlin: Site, site_ohio: Site) -> Rollout:
    """v2 across both regions (two nodes each, one small node each excluded); it failed on plant-ohio/o0."""
    model = make_model("defects")
    v1 = valid_version(model, onnx_factory.linear(seed=3), version="1.0.0")
    v2 = valid_version(model, onnx_factory.linear(seed=4), version="2.0.0", min_memory_mb=4096)
    nodes = fleet(site_berlin, 2, prefix="b") + fleet(site_ohio, 2, prefix="o")
    make_node(site_berlin, "b-small", memory_mb=1024)
    make_node(site_ohio, "o-small", memory_mb=1024)
    for site in (site_berlin, site_ohio):
        deploy(v1, site)
    for node in nodes:
        report(node, serving("defects", "1.0.0"))
    rollout = services.rollout_create(actor=ACTOR, user=None, version=v2, target={"regions": ["eu", "us"]},
                                      strategy={"canary_nodes": 4, "percentages": [100], "gate": None})
    rollout = tick(services.rollout_start(actor=ACTOR, rollout=rollout))
    ohio = nodes[2]
    report(ohio, ModelStatus(name="defects", version="2.0.0", state="failed", error="smoke test failed",
                             serving_version="1.0.0"))
    rollout = tick(rollout)
    assert rollout.state == RolloutState.ROLLING_BACK and "plant-ohio/o0: smoke test failed" in rollout.reason
    return rollout


def test_a_region_viewer_sees_only_their_regions_nodes(estate_rollout: Rollout, viewer: Any) -> None:
    page = client_for(viewer).get(reverse("rollouts:rollout-detail", args=[estate_rollout.uuid])).content.decode()
    assert 'data-node="b0"' in page and 'data-node="b1"' in page
    assert "plant-berlin/b-small" in page  # its own region's exclusion
    for hidden in ("o0", "o1", "o-small", "plant-ohio", "Plant Ohio"):
        assert hidden not in page, hidden
    assert HIDDEN_NODE in page  # the reason names the failed node without saying which
    assert "2 more node(s) at sites you may not see" in page
    assert "and 2 at sites you may not see" in page  # the canary wave's other half


def test_an_estate_viewer_sees_every_node(estate_rollout: Rollout) -> None:
    everyone = make_user("estate-viewer", groups=("Viewer",))
    page = client_for(everyone).get(reverse("rollouts:rollout-detail", args=[estate_rollout.uuid])).content.decode()
    for name in ('data-node="b0"', 'data-node="o0"', "plant-ohio/o-small", "plant-ohio/o0: smoke test failed"):
        assert name in page, name
    assert HIDDEN_NODE not in page and "sites you may not see" not in page


def test_the_list_counts_only_visible_nodes(estate_rollout: Rollout, viewer: Any) -> None:
    page = client_for(viewer).get(reverse("rollouts:rollout-list")).content.decode()
    row = page[page.index(str(estate_rollout.uuid)):]
    row = row[:row.index("</tr>")]
    assert '<td class="num">2' in row  # two of its four nodes are the viewer's


def test_a_rollout_with_none_of_the_users_sites_is_not_found(site_ohio: Site, viewer: Any) -> None:
    make_site(Region.objects.get(slug="eu"), "plant-lyon", name="Plant Lyon")  # the viewer's region, not touched
    model = make_model("counter")
    version = valid_version(model, onnx_factory.linear(seed=5), version="1.0.0")
    fleet(site_ohio, 1)
    rollout = services.rollout_create(actor=ACTOR, user=None, version=version, target={"sites": [site_ohio.slug]})
    client = client_for(viewer)
    assert client.get(reverse("rollouts:rollout-detail", args=[rollout.uuid])).status_code == 404
    assert str(rollout.uuid) not in client.get(reverse("rollouts:rollout-list")).content.decode()

"""The demo's data: a realistic dataset per site, in every file kind, that federated queries can answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from demo import datasets, fleet, training
from edge_runtime.data.catalog import Catalog
from policies.models import PolicyVersion
from tests.models_registry.helpers import make_node
from tests.queries.helpers import answer_locally, create, register_catalog


@pytest.mark.django_db
def test_it_writes_each_sites_datasets_in_every_kind_and_queries_answer_over_them(
    tmp_path: Path, admin_user: Any
) -> None:
    fleet.sites_ensure()
    datasets.data_policy_ensure()
    datasets.data_policy_ensure()
    assert PolicyVersion.objects.filter(policy__kind="data").count() == 1
    nodes: dict[str, Any] = {}
    kinds: dict[str, set[str]] = {}
    means: dict[str, float] = {}
    for slug, (name, _) in datasets.DATA_NODES.items():
        folder = tmp_path / slug
        assert datasets.node_datasets_ensure(folder, slug, name) == ["sensor_readings", "production", "defects"]
        assert datasets.node_datasets_ensure(folder, slug, name) == []  # written once
        assert datasets.node_datasets_ensure(tmp_path / "other", slug, "line-3") == []  # only the keeper has data
        schemas = {s.name: s for s in Catalog.from_state_dir(folder).check()}
        assert schemas["sensor_readings"].row_count == datasets.DEMO_READINGS
        assert schemas["production"].row_count > 300 and schemas["defects"].row_count >= 200
        assert schemas["sensor_readings"].column_names[3:] == list(training.FEATURES)
        kinds[slug] = {s.kind for s in schemas.values()}
        frame = datasets.plant_datasets(slug)["sensor_readings"][0]
        means[slug] = float(frame["temperature_c"].mean())
        from sites.models import Site

        node, _ = make_node(Site.objects.get(slug=slug), name)
        entries = json.loads((folder / "datasets.json").read_text())["datasets"]
        register_catalog(node, folder, entries)
        nodes[slug] = (node, folder, entries)
    assert all(k == {"csv", "parquet", "sqlite"} for k in kinds.values())
    assert len({round(m, 3) for m in means.values()}) == 3  # each site's data differs

    from sites.models import Site

    sites = list(Site.objects.filter(slug__in=datasets.DATA_NODES))
    by_line = create(admin_user, sites, {"dataset": "sensor_readings", "group_by": ["line"],
                                         "time_bucket": {"column": "ts", "interval": "day"},
                                         "aggregates": [{"op": "count"}, {"op": "mean", "column": "temperature_c"}]})
    answer_locally(by_line, nodes)
    by_line.refresh_from_db()
    lines = sum(len(p.lines) for p in datasets.PLANTS.values())
    assert by_line.state == "complete" and len(by_line.merged()["rows"]) == lines * datasets.DEMO_DAYS
    # The hospital's rule keeps machines out of its defect groups: it refuses, the others answer.
    by_machine = create(admin_user, sites, {"dataset": "defects", "group_by": ["machine"],
                                            "aggregates": [{"op": "count"}]})
    answer_locally(by_machine, nodes)
    by_machine.refresh_from_db()
    refused = by_machine.sites.get(state="refused")
    assert (by_machine.state, refused.site.slug, refused.rule) == ("partial", "hospital-osaka", "group_columns")

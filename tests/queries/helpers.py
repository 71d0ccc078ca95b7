"""Plant data written for nodes, the data policy, and a few shortcuts for the query tests."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from audit.services import Actor
from edge_runtime.data.catalog import Catalog
from policies import services as policy_services
from queries.models import FederatedQuery
from queries.services.catalog import dataset_catalog_report
from queries.services.lifecycle import query_create

ACTOR = Actor.system("test")
SPEC: dict[str, Any] = {
    "dataset": "readings",
    "group_by": ["line", "machine"],
    "aggregates": [
        {"op": "count"},
        {"op": "mean", "column": "temperature"},
        {"op": "std", "column": "temperature"},
        {"op": "sum", "column": "parts"},
        {"op": "min", "column": "temperature"},
        {"op": "max", "column": "temperature"},
    ],
}


def plant_frame(seed: int, *, rows: int = 3000, lines: tuple[str, ...] = ("L1", "L2")) -> pd.DataFrame:
    """Sensor readings of one plant: per line and machine, over a week; different per seed."""
    rng = np.random.default_rng(seed)
    line = rng.choice(np.array(lines, dtype=object), rows)
    machine = rng.choice(np.array(["M1", "M2", "M3"], dtype=object), rows)
    ts = pd.Timestamp("2024-03-04") + pd.to_timedelta(np.sort(rng.integers(0, 7 * 86_400, rows)), unit="s")
    base = {"M1": 55.0, "M2": 61.0, "M3": 70.0}
    temperature = np.array([base[m] for m in machine]) + rng.normal(seed % 5, 2.0, rows)
    return pd.DataFrame({"line": line, "machine": machine, "ts": ts, "temperature": temperature,
                         "parts": rng.poisson(12, rows).astype(np.int64), "defect": rng.random(rows) < 0.02})


def write_dataset(folder: Path, frame: pd.DataFrame, kind: str, name: str = "readings") -> dict[str, Any]:
    """Write ``frame`` as a ``kind`` file in ``folder`` and return its datasets.json entry."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        frame.to_parquet(folder / f"{name}.parquet", index=False)
        return {"name": name, "kind": "parquet", "path": f"{name}.parquet", "time_column": "ts"}
    if kind == "csv":
        frame.to_csv(folder / f"{name}.csv", index=False)
        return {"name": name, "kind": "csv", "path": f"{name}.csv", "time_column": "ts",
                "columns": {"line": "string", "machine": "string"}}
    out = frame.copy()
    out["ts"] = out["ts"].astype("int64") // 10**9
    with sqlite3.connect(folder / f"{name}.sqlite3") as conn:
        conn.execute(f"CREATE TABLE {name} (line TEXT, machine TEXT, ts INTEGER, temperature REAL, parts INTEGER, "
                     "defect BOOLEAN)")
        conn.executemany(f"INSERT INTO {name} VALUES (?, ?, ?, ?, ?, ?)",
                         out.astype(object).itertuples(index=False, name=None))
    return {"name": name, "kind": "sqlite", "path": f"{name}.sqlite3", "table": name, "time_column": "ts"}


def write_datasets_file(state_dir: Path, entries: list[dict[str, Any]]) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "datasets.json"
    path.write_text(json.dumps({"datasets": entries}))
    return path


def data_policy(document: dict[str, Any]) -> None:
    policy_services.policy_update(actor=ACTOR, kind="data", document=document)


OPEN_POLICY: dict[str, Any] = {"default": {"datasets": {"readings": {}}, "min_group_size": 1}}


def register_catalog(node: Any, folder: Path, entries: list[dict[str, Any]]) -> None:
    """Record a node's catalog as its sync would, from real files (for tests that need no node process)."""
    report = Catalog.from_config({"datasets": entries}, base_dir=folder).report()
    dataset_catalog_report(node=node, report=report, actor=Actor.node(node))
    node.actual_state = {**(node.actual_state or {}), "detail": {"datasets": report}}
    node.save(update_fields=["actual_state"])


def create(user: Any, sites: list[Any], spec: dict[str, Any] | None = None, **kwargs: Any) -> FederatedQuery:
    return query_create(actor=Actor.user(user) if user.is_authenticated else ACTOR, user=user,
                        spec=spec or SPEC, sites=sites, **kwargs)


def pandas_reference(frames: list[pd.DataFrame]) -> pd.DataFrame:
    union = pd.concat(frames, ignore_index=True)
    grouped = union.groupby(["line", "machine"])
    return pd.DataFrame({
        "count": grouped.size(), "mean_temperature": grouped["temperature"].mean(),
        "std_temperature": grouped["temperature"].std(), "sum_parts": grouped["parts"].sum(),
        "min_temperature": grouped["temperature"].min(), "max_temperature": grouped["temperature"].max(),
    }).reset_index()


def answer_locally(query: FederatedQuery, nodes: dict[str, tuple[Any, Path, list[dict[str, Any]]]]) -> None:
    """Answer ``query`` at each site as its node would (the real engine over the real files), then record it."""
    from edge_runtime.data.engine import run_query
    from edge_runtime.policy.data import SiteFacts
    from policies.selectors import data_policy_for_site
    from queries.services.results import query_result_record

    for row in query.sites.select_related("site", "node"):
        node, folder, entries = nodes[row.site.slug]
        _, _, policy = data_policy_for_site(row.site)
        result = run_query(query.spec, catalog=Catalog.from_config({"datasets": entries}, base_dir=folder),
                           policy=policy, site_facts=SiteFacts(site=row.site.slug), query_id=str(query.uuid))
        query_result_record(node=node, query_id=str(query.uuid), result=result, actor=Actor.node(node))

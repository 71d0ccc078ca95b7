"""The demo's data for federated queries: a week of plant data per site, in every file kind the data engine reads.

Seeded per site, so every run writes the same data and every site's differs;
files already written are kept, so set-up is safe to run again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from demo.fleet import ACTOR
from policies.selectors import data_policy_current
from policies.services import policy_update

# Which node of a site keeps its data, and in which file kind each dataset is kept there: every kind the data
# engine reads appears at every site, each dataset in a different kind per site.
DATA_NODES: dict[str, tuple[str, dict[str, str]]] = {
    "plant-berlin": ("gw-1", {"sensor_readings": "parquet", "production": "sqlite", "defects": "csv"}),
    "store-042": ("pos-1", {"sensor_readings": "csv", "production": "parquet", "defects": "sqlite"}),
    "hospital-osaka": ("srv-1", {"sensor_readings": "sqlite", "production": "csv", "defects": "parquet"}),
}


@dataclass(frozen=True)
class DemoPlant:
    """What runs at a site: its lines and each line's machines, and how warm and busy they run."""

    seed: int
    lines: dict[str, tuple[str, ...]]
    temperature_c: float
    parts_per_hour: int
    defect_types: tuple[str, ...]


PLANTS: dict[str, DemoPlant] = {
    "plant-berlin": DemoPlant(11, {"assembly-1": ("press-01", "press-02", "robot-07"),
                                   "assembly-2": ("press-03", "robot-08"),
                                   "machining": ("cnc-11", "cnc-12", "cnc-13", "lathe-04")},
                              68.0, 240, ("scratch", "burr", "dimension", "crack")),
    "store-042": DemoPlant(42, {"bakery": ("oven-1", "oven-2", "proofer-1"),
                                "cold-chain": ("fridge-01", "fridge-02", "freezer-01")},
                           24.0, 90, ("temperature-excursion", "packaging", "label")),
    "hospital-osaka": DemoPlant(7, {"sterilisation": ("autoclave-1", "autoclave-2"),
                                    "imaging": ("mri-1", "ct-1", "ct-2")},
                                41.0, 30, ("cycle-fail", "calibration", "artefact")),
}
DEMO_DAYS = 7
DEMO_READINGS = 24_000
# The demo's readings start here (a Monday, so weekly buckets line up).
DEMO_START = "2024-03-04T00:00:00"

DEMO_DATA_POLICY: dict[str, Any] = {
    "default": {
        "datasets": {"sensor_readings": {}, "production": {}, "defects": {}},
        "min_group_size": 5,
    },
    "rules": [{
        "name": "osaka-patient-safety",
        "description": "At the hospital, defects are counted per line only, and no single value leaves.",
        "where": {"sites": ["hospital-osaka"]},
        "policy": {
            "datasets": {"sensor_readings": {}, "production": {},
                         "defects": {"group_columns": ["line", "defect_type"]}},
            "aggregates": ["count", "sum", "mean", "std", "var", "quantile"],
            "min_group_size": 10,
        },
    }],
}


def data_policy_ensure() -> None:
    """Write the demo's data policy as version 1 if the estate has none (an operator's own policy stays)."""
    if data_policy_current()[0] == 0:
        policy_update(actor=ACTOR, kind="data", document=DEMO_DATA_POLICY, comment="demo data policy")


def plant_datasets(site_slug: str) -> dict[str, Any]:
    """The demo data of one site as pandas frames: sensor readings, hourly production counts, defects.

    Readings are the eight features the demo models take (so a query can score them with the defect
    classifier), per line and machine over a week, with a daily rhythm, a machine running hot and a few
    sensor dropouts; production and defects follow the same lines. Seeded per site: every run writes the
    same data, and every site's differs.
    """
    import numpy as np

    plant = PLANTS[site_slug]
    # One generator drawn in a fixed order (readings, production, defects): the same data on every run.
    rng = np.random.default_rng(plant.seed)
    readings = _readings(plant, rng)
    production = _production(plant, rng)
    defects = _defects(plant, rng, readings)
    return {"sensor_readings": (readings, "ts"), "production": (production, "ts"), "defects": (defects, "found_at")}


def _readings(plant: DemoPlant, rng: Any) -> Any:
    """Sensor readings per line and machine over the demo's week, one machine running hot."""
    import numpy as np
    import pandas as pd

    pairs = [(line, machine) for line, machines in plant.lines.items() for machine in machines]
    pick = rng.integers(0, len(pairs), DEMO_READINGS)
    lines = np.array([p[0] for p in pairs], dtype=object)[pick]
    machines = np.array([p[1] for p in pairs], dtype=object)[pick]
    offset = np.sort(rng.integers(0, DEMO_DAYS * 86_400, DEMO_READINGS))
    ts = pd.Timestamp(DEMO_START) + pd.to_timedelta(offset, unit="s")
    hot = pick == plant.seed % len(pairs)  # one machine per site runs hot
    daily = 3.0 * np.sin(2 * np.pi * (offset % 86_400) / 86_400)
    temperature = plant.temperature_c + daily + 9.0 * hot + rng.normal(0, 2.0, DEMO_READINGS) + pick % 3
    temperature[rng.random(DEMO_READINGS) < 0.002] = np.nan  # sensor dropouts
    return pd.DataFrame({
        "line": lines, "machine": machines, "ts": ts,
        "temperature_c": temperature,
        "vibration_mm_s": rng.gamma(2.0, 1.1 + 0.8 * hot, DEMO_READINGS),
        "pressure_bar": rng.normal(6.0, 0.5, DEMO_READINGS),
        "spindle_rpm": rng.normal(12_000.0, 1_200.0, DEMO_READINGS),
        "feed_mm_per_rev": rng.normal(0.2, 0.03, DEMO_READINGS),
        "load_pct": rng.uniform(20.0, 95.0, DEMO_READINGS),
        "humidity_pct": rng.normal(45.0, 8.0, DEMO_READINGS),
        "hours_since_service": (offset / 3600.0 + rng.uniform(0, 300, DEMO_READINGS)) % 400,
    })


def _production(plant: DemoPlant, rng: Any) -> Any:
    """Parts produced and rejected per line and hour, fewer at night, with the shift."""
    import numpy as np
    import pandas as pd

    hours = pd.date_range(DEMO_START, periods=DEMO_DAYS * 24, freq="h")
    line_names = list(plant.lines)
    grid = pd.MultiIndex.from_product([line_names, hours], names=["line", "ts"]).to_frame(index=False)
    night = (grid["ts"].dt.hour < 6) | (grid["ts"].dt.hour >= 22)
    produced = rng.poisson(plant.parts_per_hour * np.where(night, 0.4, 1.0))
    grid["shift"] = np.select([grid["ts"].dt.hour < 6, grid["ts"].dt.hour < 14, grid["ts"].dt.hour < 22],
                              ["night", "early", "late"], "night")
    grid["parts_produced"] = produced.astype(np.int64)
    grid["parts_rejected"] = rng.binomial(produced, 0.02 + 0.01 * rng.random(len(grid))).astype(np.int64)
    return grid[["line", "shift", "ts", "parts_produced", "parts_rejected"]]


def _defects(plant: DemoPlant, rng: Any, readings: Any) -> Any:
    """Defects found at a sample of the readings' lines, machines and times, by found_at."""
    import numpy as np
    import pandas as pd

    found = readings.sample(n=max(200, DEMO_READINGS // 40), random_state=plant.seed)
    return pd.DataFrame({
        "line": found["line"].to_numpy(), "machine": found["machine"].to_numpy(),
        "found_at": found["ts"].to_numpy(),
        "defect_type": rng.choice(np.array(plant.defect_types, dtype=object), len(found)),
        "severity": rng.integers(1, 6, len(found)).astype(np.int64),
    }).sort_values("found_at", ignore_index=True)


DATASET_DESCRIPTIONS = {
    "sensor_readings": "Machine sensor readings per line and machine (the eight features the demo models take).",
    "production": "Parts produced and rejected per line and hour, with the shift.",
    "defects": "Defects found per line and machine, with their type and severity (1-5).",
}


def node_datasets_ensure(state_dir: Any, site_slug: str, node_name: str) -> list[str]:
    """Write the site's demo datasets and ``datasets.json`` into the state dir of the node that keeps them.

    Returns the datasets written; nothing for a node that keeps none, nor when the files are there already.
    """
    import sqlite3
    from pathlib import Path

    keeper = DATA_NODES.get(site_slug)
    if keeper is None or keeper[0] != node_name:
        return []
    folder = Path(state_dir)
    config = folder / "datasets.json"
    if config.exists():
        return []
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, (frame, time_column) in plant_datasets(site_slug).items():
        kind = keeper[1][name]
        entry: dict[str, Any] = {"name": name, "kind": kind, "time_column": time_column,
                                 "description": DATASET_DESCRIPTIONS[name]}
        if kind == "parquet":
            frame.to_parquet(data_dir / f"{name}.parquet", index=False)
            entry["path"] = f"data/{name}.parquet"
        elif kind == "csv":
            frame.to_csv(data_dir / f"{name}.csv", index=False)
            entry["path"] = f"data/{name}.csv"
        else:
            path = data_dir / f"{name}.sqlite3"
            path.unlink(missing_ok=True)
            out = frame.copy()
            out[time_column] = out[time_column].astype("datetime64[s]").astype("int64")  # epoch seconds
            with sqlite3.connect(path) as conn:
                declared = {time_column: "TIMESTAMP"}
                out.to_sql(name, conn, index=False, dtype=declared)
            entry.update(path=f"data/{name}.sqlite3", table=name)
        entries.append(entry)
    config.write_text(json.dumps({"datasets": entries}, indent=2))
    return [e["name"] for e in entries]

"""Demo data: three regions, three sites, the nodes that run at them, and two models.

Everything is written through the same services an operator's actions use,
so the demo's regions, sites, tokens, nodes, models and deployments appear in
the audit trail like any others. Every function here is safe to run again: it
reuses what exists. The processes of the demo (control plane, Celery, edge
runtimes) are started by ``manage.py demo``.

The demo models are trained here, at set-up, on synthetic sensor data of a
machining line (scikit-learn, converted with skl2onnx), so the demo ships no
binary artifact and fetches nothing. Seeds are fixed and the ONNX graph gets a
fixed name, so training again gives the same bytes and therefore the same
content-addressed artifact.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction

from audit.services import Actor, audit_record
from models_registry import services as registry
from models_registry.models import Model, ModelVersion, VersionStatus
from sites import services
from sites.models import Node, Region, Site

ACTOR = Actor.system("demo")
ADMIN_USERNAME = "admin"


@dataclass(frozen=True)
class DemoRegion:
    slug: str
    name: str
    description: str


@dataclass(frozen=True)
class DemoNode:
    name: str
    role: str  # a sites.models.NodeRole value


@dataclass(frozen=True)
class DemoSite:
    slug: str
    name: str
    region: str  # DemoRegion.slug
    jurisdiction: str
    connectivity: str  # a sites.models.Connectivity value
    latitude: float
    longitude: float
    labels: dict[str, str] = field(default_factory=dict)
    nodes: tuple[DemoNode, ...] = ()


REGIONS: tuple[DemoRegion, ...] = (
    DemoRegion("europe", "Europe", "Plants and offices in the EU; data governed under GDPR."),
    DemoRegion("americas", "Americas", "Retail stores in North and South America."),
    DemoRegion("asia-pacific", "Asia-Pacific", "Hospitals and clinics in Japan and Australia."),
)

SITES: tuple[DemoSite, ...] = (
    DemoSite(
        slug="plant-berlin", name="Plant Berlin", region="europe", jurisdiction="DE",
        connectivity="connected", latitude=52.5200, longitude=13.4050,
        labels={"kind": "plant", "line": "assembly", "tier": "production"},
        nodes=(DemoNode("gw-1", "gateway"), DemoNode("line-3", "device")),
    ),
    DemoSite(
        slug="store-042", name="Store 042", region="americas", jurisdiction="US",
        connectivity="intermittent", latitude=41.8781, longitude=-87.6298,
        labels={"kind": "store", "format": "urban", "tier": "production"},
        nodes=(DemoNode("pos-1", "device"),),
    ),
    DemoSite(
        slug="hospital-osaka", name="Hospital Osaka", region="asia-pacific", jurisdiction="JP",
        connectivity="connected", latitude=34.6937, longitude=135.5023,
        labels={"kind": "hospital", "department": "radiology", "tier": "production"},
        nodes=(DemoNode("srv-1", "server"),),
    ),
)


def admin_reset() -> str:
    """Create the superuser ``admin`` or reset its password; returns the new password."""
    password = secrets.token_urlsafe(12)
    User = get_user_model()
    with transaction.atomic():
        user, created = User.objects.get_or_create(
            username=ADMIN_USERNAME, defaults={"email": "admin@example.org"}
        )
        user.is_staff = True
        user.is_superuser = True
        user.is_active = True
        user.set_password(password)
        user.save()
        audit_record(
            actor=ACTOR, action="user.create" if created else "user.password_reset", obj=user,
            after={"username": ADMIN_USERNAME, "superuser": True},
        )
    return password


def regions_ensure() -> dict[str, Region]:
    regions: dict[str, Region] = {}
    for spec in REGIONS:
        region = Region.objects.filter(slug=spec.slug).first()
        if region is None:
            region = services.region_create(
                actor=ACTOR, slug=spec.slug, name=spec.name, description=spec.description
            )
        regions[spec.slug] = region
    return regions


def sites_ensure() -> list[Site]:
    """The demo sites, created where missing. An existing site keeps its attributes
    (an operator may have edited them while exploring)."""
    regions = regions_ensure()
    sites: list[Site] = []
    for spec in SITES:
        site = Site.objects.select_related("region").filter(slug=spec.slug).first()
        if site is None:
            fields: dict[str, Any] = {
                "jurisdiction": spec.jurisdiction,
                "connectivity": spec.connectivity,
                "latitude": spec.latitude,
                "longitude": spec.longitude,
                "labels": dict(spec.labels),
            }
            site = services.site_create(
                actor=ACTOR, region=regions[spec.region], slug=spec.slug, name=spec.name, **fields
            )
        sites.append(site)
    return sites


def site_spec(slug: str) -> DemoSite:
    return next(spec for spec in SITES if spec.slug == slug)


def node_active(site: Site, name: str) -> Node | None:
    return Node.objects.filter(site=site, name=name, revoked_at__isnull=True).first()


def node_retire(node: Node) -> None:
    """Revoke a demo node whose state directory is gone, so its name can enroll again."""
    services.node_revoke(actor=ACTOR, node=node)


def enrollment_token(site: Site) -> str:
    """A one-use token, valid for ten minutes: long enough to enroll one demo node."""
    _, value = services.token_create(
        actor=ACTOR, site=site, max_uses=1, lifetime=dt.timedelta(minutes=10), note="demo"
    )
    return value


# -- demo models ----------------------------------------------------------------

# The sensor reading both demo models take, in this order: one float32 row each.
FEATURES: tuple[str, ...] = (
    "temperature_c", "vibration_mm_s", "pressure_bar", "spindle_rpm",
    "feed_mm_per_rev", "load_pct", "humidity_pct", "hours_since_service",
)
INPUT_NAME = "features"
# A hot, shaking spindle long after its last service: what the demo's curl sends.
SAMPLE_READING: tuple[float, ...] = (78.5, 4.6, 6.9, 13400.0, 0.26, 91.0, 52.0, 380.0)
TRAINING_ROWS = 2000
SEED = 7


@dataclass(frozen=True)
class DemoModel:
    slug: str
    name: str
    description: str
    sites: tuple[str, ...]  # DemoSite.slug values it is deployed to
    version: str = "1.0.0"
    allow_quantized: bool = False
    preferred_providers: tuple[str, ...] = ()


MODELS: tuple[DemoModel, ...] = (
    DemoModel(
        slug="defect-classifier", name="Defect classifier",
        description=("Probability that the part being machined is defective, from one sensor reading "
                     f"({', '.join(FEATURES)}). Outputs: label (INT64, 1 = defect) and "
                     "probabilities (FP32, [ok, defect])."),
        sites=("plant-berlin", "store-042", "hospital-osaka"),
        # Devices get the int8 variant: the demo shows placement picking one.
        allow_quantized=True,
    ),
    DemoModel(
        slug="wear-regressor", name="Tool wear regressor",
        description=(f"Tool wear in percent, from one sensor reading ({', '.join(FEATURES)}). "
                     "Output: wear_pct (FP32, [n, 1])."),
        sites=("plant-berlin",),
        # It would rather run on a GPU; on a machine without one the node page flags the CPU fallback.
        preferred_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    ),
)


def plant_data(rows: int = TRAINING_ROWS, seed: int = SEED) -> tuple[Any, Any, Any]:
    """Synthetic readings of a machining line: (features [rows, 8], defect 0/1, tool wear %).

    Defects grow likelier with heat, vibration, pressure off its set point,
    load and time since service; wear grows with hours, vibration and load.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    temperature = rng.normal(65.0, 8.0, rows)
    vibration = rng.gamma(2.0, 1.2, rows)
    pressure = rng.normal(6.0, 0.6, rows)
    spindle = rng.normal(12000.0, 1500.0, rows)
    feed = rng.normal(0.2, 0.04, rows)
    load = rng.uniform(20.0, 95.0, rows)
    humidity = rng.normal(45.0, 10.0, rows)
    hours = rng.uniform(0.0, 400.0, rows)
    x = np.column_stack([temperature, vibration, pressure, spindle, feed, load, humidity, hours]).astype(np.float32)
    logit = (0.08 * (temperature - 65) + 0.9 * (vibration - 2.4) + 0.5 * np.abs(pressure - 6)
             + 0.004 * (hours - 200) + 0.03 * (load - 57) - 2.2)
    defect = (rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    wear = np.clip(0.15 * hours + 4 * vibration + 0.1 * (load - 50) + 0.002 * (spindle - 12000)
                   + rng.normal(0.0, 3.0, rows), 0.0, 100.0).astype(np.float32)
    return x, defect, wear


def models_train() -> dict[str, bytes]:
    """Train and convert the demo models: ONNX bytes by model slug, identical on every run.

    scikit-learn and skl2onnx are imported here, not at module level, so that
    ``manage.py`` commands other than the demo's set-up do not pay for them.
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, defect, wear = plant_data()
    with warnings.catch_warnings():
        # A small network with few iterations keeps set-up to about a second; it need not converge fully.
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier = make_pipeline(
            StandardScaler(), MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=SEED)).fit(x, defect)
        regressor = make_pipeline(
            StandardScaler(), MLPRegressor(hidden_layer_sizes=(16,), max_iter=500, random_state=SEED)).fit(x, wear)
    # One float32 input [n, 8], so any Open Inference Protocol client can call it with plain tensors.
    inputs = [(INPUT_NAME, FloatTensorType([None, len(FEATURES)]))]
    converted = {
        # zipmap off: probabilities as an FP32 tensor, not a sequence of maps that OIP cannot carry.
        # A fixed graph name: skl2onnx otherwise names each graph with a random uuid.
        "defect-classifier": convert_sklearn(classifier, name="defect_classifier", initial_types=inputs,
                                             options={id(classifier): {"zipmap": False}}, target_opset=17),
        "wear-regressor": convert_sklearn(regressor, name="wear_regressor", initial_types=inputs,
                                          final_types=[("wear_pct", FloatTensorType([None, 1]))], target_opset=17),
    }
    return {slug: onnx_model.SerializeToString() for slug, onnx_model in converted.items()}


@dataclass(frozen=True)
class DemoModelState:
    spec: DemoModel
    version: ModelVersion
    sites: tuple[str, ...]  # where it is deployed ("" when the version could not be made valid)


def models_ensure(sites: list[Site]) -> list[DemoModelState]:
    """Register, validate and deploy the demo models, reusing what exists.

    Validation runs here, in this process, so the versions are ``valid``
    before any node enrolls; the task queued by the upload then finds nothing
    to claim. Models are trained only when a version is missing.
    """
    by_slug = {site.slug: site for site in sites}
    artifacts: dict[str, bytes] | None = None
    states: list[DemoModelState] = []
    for spec in MODELS:
        model = Model.objects.filter(slug=spec.slug).first()
        if model is None:
            model = registry.model_create(actor=ACTOR, slug=spec.slug, name=spec.name, description=spec.description)
        version = ModelVersion.objects.filter(model=model, version=spec.version).first()
        if version is None:
            artifacts = artifacts if artifacts is not None else models_train()
            version = registry.model_version_upload(
                actor=ACTOR, model=model, version=spec.version, file=io.BytesIO(artifacts[spec.slug]),
                allow_quantized=spec.allow_quantized, preferred_providers=spec.preferred_providers,
                max_batch_size=32, max_queue_delay_ms=2.0,
            )
        if version.status == VersionStatus.UPLOADED:
            version = registry.model_version_validate(version_id=version.pk) or version
        version.refresh_from_db()
        if version.status != VersionStatus.VALID:
            # Not deployable (still validating after a killed run, or refused by this onnxruntime): say so, go on.
            states.append(DemoModelState(spec=spec, version=version, sites=()))
            continue
        targets = [by_slug[slug] for slug in spec.sites if slug in by_slug]
        registry.deployment_create(actor=ACTOR, version=version, sites=targets)
        states.append(DemoModelState(spec=spec, version=version, sites=tuple(s.slug for s in targets)))
    return states


def infer_body(reading: tuple[float, ...] = SAMPLE_READING) -> str:
    """An Open Inference Protocol v2 request body for one reading, as compact JSON."""
    return json.dumps({"inputs": [{"name": INPUT_NAME, "shape": [1, len(FEATURES)], "datatype": "FP32",
                                   "data": list(reading)}]}, separators=(",", ":"))


def curl_command(inference_url: str, model: str = "defect-classifier") -> str:
    """A ready-to-paste command that calls ``model`` on the node serving at ``inference_url``."""
    return (f"curl -s {inference_url}/v2/models/{model}/infer -H 'Content-Type: application/json' "
            f"-d '{infer_body()}'")


# -- demo data for federated queries ------------------------------------------------------------------------------

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
    from policies.queries.selectors import data_policy_current
    from policies.services import policy_update

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
    import pandas as pd

    plant = PLANTS[site_slug]
    rng = np.random.default_rng(plant.seed)
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
    readings = pd.DataFrame({
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
    hours = pd.date_range(DEMO_START, periods=DEMO_DAYS * 24, freq="h")
    line_names = list(plant.lines)
    grid = pd.MultiIndex.from_product([line_names, hours], names=["line", "ts"]).to_frame(index=False)
    night = (grid["ts"].dt.hour < 6) | (grid["ts"].dt.hour >= 22)
    produced = rng.poisson(plant.parts_per_hour * np.where(night, 0.4, 1.0))
    grid["shift"] = np.select([grid["ts"].dt.hour < 6, grid["ts"].dt.hour < 14, grid["ts"].dt.hour < 22],
                              ["night", "early", "late"], "night")
    grid["parts_produced"] = produced.astype(np.int64)
    grid["parts_rejected"] = rng.binomial(produced, 0.02 + 0.01 * rng.random(len(grid))).astype(np.int64)
    production = grid[["line", "shift", "ts", "parts_produced", "parts_rejected"]]
    found = readings.sample(n=max(200, DEMO_READINGS // 40), random_state=plant.seed)
    defects = pd.DataFrame({
        "line": found["line"].to_numpy(), "machine": found["machine"].to_numpy(),
        "found_at": found["ts"].to_numpy(),
        "defect_type": rng.choice(np.array(plant.defect_types, dtype=object), len(found)),
        "severity": rng.integers(1, 6, len(found)).astype(np.int64),
    }).sort_values("found_at", ignore_index=True)
    return {"sensor_readings": (readings, "ts"), "production": (production, "ts"), "defects": (defects, "found_at")}


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

"""The demo's two models: trained, registered, validated and deployed, and a request that calls them.

The models are trained here, at set-up, on synthetic sensor data of a
machining line (scikit-learn, converted with skl2onnx), so the demo ships no
binary artifact and fetches nothing. Seeds are fixed and the ONNX graph gets a
fixed name, so training again gives the same bytes and therefore the same
content-addressed artifact. Every function here is safe to run again: it
reuses what exists.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

from demo.fleet import ACTOR
from models_registry import services as registry
from models_registry.models import Model, ModelVersion, VersionStatus
from sites.models import Site

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

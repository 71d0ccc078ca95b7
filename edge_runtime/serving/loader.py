"""Loading an ONNX model: execution provider choice, signature, smoke test.

Provider order for one model: the model's own preference (``DesiredModel.
providers``), then the node's priority list, each kept only if this ONNX
Runtime build has it, and ``CPUExecutionProvider`` always last so that there
is always something to run on. A provider the model *requires* but the node
lacks is a refusal (:class:`ProviderError`), never a silent CPU fallback. ONNX
Runtime itself may still fall back when a provider fails to initialise (a
missing CUDA library, say); the provider the session actually runs on is
recorded as :attr:`LoadedModel.provider`, and a required provider missing
from the session is refused too.

A model is smoke-tested before anyone can send it a request: one inference
on generated inputs (dynamic dimensions set to 1), so that a model that
loads but cannot run is refused while the previous version keeps serving.
A few more timed runs on the same inputs tell the batcher what one call
costs once warm (the first run also allocates); they are skipped for a
model whose first run was slow, which the batcher treats as slow anyway.

Session options (:func:`session_options`): onnxruntime's intra-op pool
keeps its own size (one thread per physical core), narrowed to the CPUs this
process may use when a container's CPU set or ``taskset`` leaves it fewer;
and its threads do not spin while they wait for work, so that they leave
the CPU to the event loop that parses requests and writes answers (why:
docs/decisions/0005-onnxruntime-threads-do-not-spin.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_runtime.serving.tensors import OIP_TO_NUMPY, Array, TensorError, oip_datatype

logger = logging.getLogger("edge_runtime.serving")

CPU = "CPUExecutionProvider"
DEFAULT_PROVIDER_PRIORITY: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    CPU,
)
# Timed warm runs after the smoke test, while all of them together stay under WARM_RUN_BELOW_S.
WARM_RUNS = 3
WARM_RUN_BELOW_S = 0.05
# Listed by get_available_providers() but not a place to run a graph: the
# Azure provider calls a remote endpoint, and inference never waits on the network.
NON_COMPUTE_PROVIDERS = frozenset({"AzureExecutionProvider"})


class LoadError(Exception):
    """A model could not be loaded or failed its smoke test; the message says why."""


class ProviderError(LoadError):
    """The node lacks an execution provider the model requires."""


def available_providers() -> list[str]:
    """The compute providers of this ONNX Runtime build, in its own order."""
    return [p for p in ort.get_available_providers() if p not in NON_COMPUTE_PROVIDERS]


def select_providers(
    *,
    preferred: Sequence[str] = (),
    required: Sequence[str] = (),
    priority: Sequence[str] = DEFAULT_PROVIDER_PRIORITY,
    available: Iterable[str] | None = None,
) -> list[str]:
    """The providers to ask ONNX Runtime for, best first, CPU last."""
    have = [p for p in (available_providers() if available is None else available) if p not in NON_COMPUTE_PROVIDERS]
    missing = [p for p in required if p not in have]
    if missing:
        raise ProviderError(
            f"the model requires {', '.join(missing)}, which this node lacks "
            f"(it has: {', '.join(have) or 'none'})"
        )
    chosen: list[str] = []
    for provider in [*preferred, *priority]:
        if provider in have and provider not in chosen and provider != CPU:
            chosen.append(provider)
    chosen.append(CPU)
    return chosen


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    # -1 marks a dynamic dimension.
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class LoadedModel:
    """A session that passed its smoke test, with what the server needs to know about it."""

    session: ort.InferenceSession
    path: Path
    provider: str
    providers: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    load_seconds: float
    smoke_seconds: float
    # The quickest warm call on the smoke-test inputs (batch 1); the batcher starts from it.
    warm_run_seconds: float = 0.0
    # Runs of this session the batcher makes side by side.
    instances: int = 1
    inputs_by_name: dict[str, TensorSpec] = field(default_factory=dict)
    output_names: list[str] = field(default_factory=list)
    output_index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inputs_by_name = {spec.name: spec for spec in self.inputs}
        self.output_names = [spec.name for spec in self.outputs]
        self.output_index = {name: i for i, name in enumerate(self.output_names)}

    @property
    def batchable(self) -> bool:
        """True if requests can be stacked along dimension 0 into one run."""
        return bool(self.inputs) and all(
            len(spec.shape) >= 1 and spec.shape[0] == -1 for spec in [*self.inputs, *self.outputs]
        )

    def run(self, feeds: dict[str, Array]) -> list[Array]:
        return list(self.session.run(self.output_names, feeds))


def _dims(shape: Sequence[Any] | None) -> tuple[int, ...]:
    # ONNX Runtime gives ints for fixed dims and strings or None for symbolic ones.
    if shape is None:
        return ()
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _spec(arg: Any) -> TensorSpec:
    try:
        datatype = oip_datatype(arg.type)
    except TensorError as exc:
        raise LoadError(f"tensor '{arg.name}': {exc}") from None
    return TensorSpec(name=arg.name, datatype=datatype, shape=_dims(arg.shape))


def smoke_inputs(specs: Sequence[TensorSpec], seed: int = 0) -> dict[str, Array]:
    """Inputs of the right dtype and shape (dynamic dims = 1): small random floats, zeros otherwise."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, Array] = {}
    for spec in specs:
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        dtype = OIP_TO_NUMPY[spec.datatype]
        if spec.datatype == "BYTES":
            array = np.full(shape, "", dtype=object)
        elif dtype.kind == "f":
            array = rng.uniform(-0.1, 0.1, size=shape).astype(dtype)
        else:
            # Zeros are valid indices and lengths, so integer inputs that
            # steer the graph (Gather indices, shapes) stay in range.
            array = np.zeros(shape, dtype=dtype)
        feeds[spec.name] = array
    return feeds


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def auto_instances(providers: Sequence[str], cpus: int = 0) -> int:
    """How many batches of one model to run side by side when the node does not say.

    Two on CPU when this process has at least two CPUs (``cpus``, 0: every
    usable one; see :mod:`.batcher` for why), one on an accelerator, whose
    kernels are not sharing cores with the event loop.
    """
    if providers and providers[0] != CPU:
        return 1
    return 2 if (cpus or usable_cpus()) >= 2 else 1


def instance_threads(instances: int, cpus: int = 0) -> int:
    """Intra-op threads for each of ``instances`` runs side by side: ``cpus`` (0: the usable CPUs) shared out.

    0 (one instance on every usable CPU) leaves the choice to :func:`session_options`.
    """
    share = cpus or usable_cpus()
    if instances <= 1 and share >= usable_cpus():
        return 0
    return max(1, share // max(instances, 1))


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """The options every served session gets; ``intra_op_threads`` 0 lets onnxruntime size its pool."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    elif usable_cpus() < (os.cpu_count() or 1):
        # onnxruntime counts the machine's cores, not those this process may run on.
        options.intra_op_num_threads = usable_cpus()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_model(
    path: Path,
    *,
    preferred: Sequence[str] = (),
    required: Sequence[str] = (),
    priority: Sequence[str] = DEFAULT_PROVIDER_PRIORITY,
    intra_op_threads: int = 0,
    instances: int = 1,
    cpus: int = 0,
) -> LoadedModel:
    """Load ``path`` with the best provider, read its signature and smoke-test it.

    ``instances`` (0: :func:`auto_instances`) is how many runs of the
    session the batcher will make side by side; unless ``intra_op_threads``
    says otherwise, each gets its share of ``cpus`` (0: every usable CPU;
    less when other serving processes share them). The count used is
    :attr:`LoadedModel.instances`.

    Raises :class:`ProviderError` or :class:`LoadError`; nothing is served
    from a model that did not come back from here.
    """
    providers = select_providers(preferred=preferred, required=required, priority=priority)
    if instances < 1:
        instances = auto_instances(providers, cpus)
    options = session_options(intra_op_threads or instance_threads(instances, cpus))
    started = time.perf_counter()
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types for a bad file
        raise LoadError(f"onnxruntime cannot load {path.name}: {_one_line(exc)}") from exc
    load_seconds = time.perf_counter() - started
    actual = list(session.get_providers())
    lost = [p for p in required if p not in actual]
    if lost:
        raise ProviderError(f"the model requires {', '.join(lost)}, but onnxruntime fell back to {actual[0]}")
    if actual and actual[0] != providers[0]:
        logger.warning("model %s asked for %s, runs on %s", path.name, providers[0], actual[0])
    inputs = [_spec(arg) for arg in session.get_inputs()]
    outputs = [_spec(arg) for arg in session.get_outputs()]
    model = LoadedModel(
        session=session, path=path, provider=actual[0] if actual else CPU, providers=actual,
        inputs=inputs, outputs=outputs, load_seconds=load_seconds, smoke_seconds=0.0, instances=instances,
    )
    _smoke_test(model)
    return model


def _smoke_test(model: LoadedModel) -> None:
    """Run the model on made-up inputs (a LoadError if it fails), then warm it up within a small budget."""
    feeds = smoke_inputs(model.inputs)
    started = time.perf_counter()
    try:
        model.run(feeds)
        model.smoke_seconds = model.warm_run_seconds = time.perf_counter() - started
        spent = 0.0
        for _ in range(WARM_RUNS):
            if model.smoke_seconds + spent >= WARM_RUN_BELOW_S:
                break
            started = time.perf_counter()
            model.run(feeds)
            took = time.perf_counter() - started
            spent += took
            # The quickest: one run that the OS preempted must not mark a cheap model as slow.
            model.warm_run_seconds = min(model.warm_run_seconds, took)
    except Exception as exc:  # noqa: BLE001 - any failure to run means the model is not usable
        raise LoadError(f"smoke test of {model.path.name} failed: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:800] if text else type(exc).__name__

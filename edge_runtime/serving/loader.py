"""Loading an ONNX model: execution provider choice, signature, smoke test, same answers.

**The providers tried** (:func:`select_providers`): the version's preference
(``DesiredModel.providers``), then the node's priority list, each kept only if
this onnxruntime build has it, is a compute provider and is not forbidden by
the version, and ``CPUExecutionProvider`` last. A node started with an
explicit provider list uses no other (``--providers CPUExecutionProvider``
forces CPU). A provider the version *requires* but the node lacks is a
refusal (:class:`ProviderError`), never a silent CPU fallback. A misspelled
provider name, in a version or a node's list, is a refusal that names it.

**Fall back, never go dark** (:func:`load_model`). Each provider in turn gets
a session of its own (that provider, and CPU for the nodes it leaves) and
must load, pass the smoke test and give CPU's answers; the first that does
serves. One that fails is left with its reason, and the next is tried, down to
CPU. Only a *required* provider that fails is a refusal: the version is not
served. Every reason is reported (``LoadedModel.fallback``).

**Truthful placement.** The accelerator session's first run is profiled:
onnxruntime's profile names the provider of every kernel it ran. ``full``:
the accelerator ran all of them; ``partial``: some ran on CPU (how many, of
the model's nodes, is reported); ``cpu_fallback``: an accelerator was on offer
but the model runs on CPU (it took none of the graph, failed, or changed the
answers); ``cpu``: CPU was all there was to use. An accelerator that takes
none of a graph is not kept: its session is CPU's anyway.

**Same answers** (:mod:`.probes`): inputs made from the signature, small ones
and ones spanning each type (large INT64, NaN), run on the accelerator and on
CPU; outputs must agree within the version's ``rtol``/``atol`` (default
tight), or the accelerator is not used for that version and the reason says
what differed.

A model is smoke-tested before anyone can send it a request, so that a model
that loads but cannot run is refused while the previous version keeps
serving. A few more timed runs tell the batcher what one call costs once
warm; they are skipped for a model whose first run was slow.

Session options (:func:`session_options`): onnxruntime's intra-op pool
keeps its own size (one thread per physical core), narrowed to the CPUs this
process may use when a container's CPU set or ``taskset`` leaves it fewer;
and its threads do not spin while they wait for work, so that they leave
the CPU to the event loop that parses requests and writes answers (why:
docs/decisions/0005-onnxruntime-threads-do-not-spin.md).

The seam for hardware a test machine lacks is ``session_factory`` (what
opens a session) with ``available`` (what the build offers).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort

from edge_runtime.protocol.providers import CPU, ProviderNameError, check_names
from edge_runtime.serving import probes
from edge_runtime.serving.providers import (
    DEFAULT_PROVIDER_PRIORITY,
    LoadError,
    ProviderError,
    ProviderPlan,
    available_providers,
    known_providers,
    select_providers,
)
from edge_runtime.serving.tensors import Array, TensorError, oip_datatype

__all__ = ["CPU", "DEFAULT_PROVIDER_PRIORITY", "LoadError", "LoadedModel", "ProviderError", "ProviderPlan",
           "TensorSpec", "available_providers", "known_providers", "load_model", "select_providers"]

logger = logging.getLogger("edge_runtime.serving")

# Timed warm runs after the smoke test, while all of them together stay under WARM_RUN_BELOW_S.
WARM_RUNS = 3
WARM_RUN_BELOW_S = 0.05
Placement = Literal["full", "partial", "cpu_fallback", "cpu"]
# What opens a session: (model path, options, providers, provider options) -> an InferenceSession.
SessionFactory = Callable[[str, ort.SessionOptions, list[str], list[dict[str, str]]], Any]


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

    session: Any
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
    # Where the graph runs (see the module's docstring), and what was given up on the way, with why.
    placement: Placement = "cpu"
    cpu_nodes: int = 0
    graph_nodes: int = 0
    fallback: str = ""
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
    return probes.plain_inputs(specs, seed)


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


@dataclass(frozen=True)
class _Context:
    """How every candidate session is made: the same for each provider tried."""

    path: Path
    plan: ProviderPlan
    intra_op_threads: int
    instances: int
    cpus: int
    factory: SessionFactory


def _open_session(path: str, options: ort.SessionOptions, providers: list[str],
                  provider_options: list[dict[str, str]]) -> Any:
    return ort.InferenceSession(path, sess_options=options, providers=providers, provider_options=provider_options)


def load_model(
    path: Path,
    *,
    preferred: Sequence[str] = (),
    required: Sequence[str] = (),
    forbidden: Sequence[str] = (),
    provider_options: Mapping[str, Mapping[str, str]] | None = None,
    rtol: float = probes.DEFAULT_RTOL,
    atol: float = probes.DEFAULT_ATOL,
    finite_inputs: bool = False,
    priority: Sequence[str] = DEFAULT_PROVIDER_PRIORITY,
    only: Sequence[str] | None = None,
    intra_op_threads: int = 0,
    instances: int = 1,
    cpus: int = 0,
    available: Iterable[str] | None = None,
    session_factory: SessionFactory | None = None,
) -> LoadedModel:
    """Load ``path`` on the best provider that runs it and gives CPU's answers; fall back down to CPU.

    ``instances`` (0: :func:`auto_instances` for the provider used) is how
    many runs of the session the batcher will make side by side; unless
    ``intra_op_threads`` says otherwise, each gets its share of ``cpus`` (0:
    every usable CPU; less when other serving processes share them).

    Raises :class:`ProviderError` (a required provider missing or unusable, a
    misspelled name) or :class:`LoadError` (no provider could run it);
    nothing is served from a model that did not come back from here.
    """
    plan = ProviderPlan(preferred=tuple(preferred), required=tuple(required), forbidden=tuple(forbidden),
                        options=provider_options or {}, rtol=rtol, atol=atol,
                        finite_inputs=finite_inputs).checked()
    if only is not None:
        try:
            only = check_names(only, "the node's providers", known=known_providers())
        except ProviderNameError as exc:
            raise ProviderError(str(exc)) from None
    chain = select_providers(preferred=plan.preferred, required=plan.required, forbidden=plan.forbidden,
                             priority=priority, available=available, only=only)
    context = _Context(path=path, plan=plan, intra_op_threads=intra_op_threads, instances=instances, cpus=cpus,
                       factory=session_factory or _open_session)
    return _choose(context, chain)


def _choose(context: _Context, chain: list[str]) -> LoadedModel:
    """Try each provider of ``chain`` in turn (CPU last); the first that serves truthfully is used."""
    reasons: list[str] = []
    reference: _Reference | None = None
    for provider in chain:
        try:
            if provider == CPU:
                cpu = reference.model if reference is not None and reference.model else _candidate(context, CPU)
                return _settle(cpu, context.path, reasons, accelerated=len(chain) > 1)
            model, kernels = _candidate_profiled(context, provider)
            reference = reference or _Reference.of(context)
            _judge(model, kernels, reference, context.plan)
            return model
        except LoadError as exc:
            if provider in context.plan.required:
                raise ProviderError(f"the model requires {provider}, which cannot serve it: {exc}") from None
            if provider == CPU:
                tried = "; ".join(reasons)
                raise LoadError(f"{exc}" + (f" (tried before CPU: {tried})" if tried else "")) from None
            logger.warning("model %s: not on %s: %s", context.path.name, provider, exc)
            reasons.append(f"{provider}: {exc}")
    raise LoadError("no execution provider to try")  # unreachable: the chain always ends with CPU


def _settle(model: LoadedModel, path: Path, reasons: list[str], *, accelerated: bool) -> LoadedModel:
    model.placement = "cpu_fallback" if accelerated else "cpu"
    model.graph_nodes = probes.graph_nodes(path)
    model.cpu_nodes = model.graph_nodes
    model.fallback = "; ".join(reasons)[:1000]
    return model


@dataclass
class _Reference:
    """The model on CPU and its answers to the probe inputs: what an accelerator is compared with."""

    model: LoadedModel | None
    answers: list[tuple[str, dict[str, Array], list[Array]]]
    problem: str = ""

    @classmethod
    def of(cls, context: _Context) -> _Reference:
        try:
            model = _candidate(context, CPU)
        except LoadError as exc:
            return cls(model=None, answers=[], problem=f"CPU cannot run it to compare with ({exc})")
        answers = []
        for name, feeds in probes.probe_inputs(model.inputs, finite=context.plan.finite_inputs):
            try:
                answers.append((name, feeds, model.run(feeds)))
            except Exception:  # noqa: BLE001,S112 - inputs the model refuses on CPU too prove nothing
                continue
        return cls(model=model, answers=answers)


def _judge(model: LoadedModel, kernels: dict[str, int], reference: _Reference, plan: ProviderPlan) -> None:
    """Placement and answers of an accelerator session; a LoadError if it is not to be used."""
    on_accelerator = sum(n for p, n in kernels.items() if p != CPU)
    on_cpu = kernels.get(CPU, 0)
    if kernels and on_accelerator == 0:
        raise LoadError(f"it takes none of the graph's nodes ({on_cpu} ran on CPU)")
    for name, feeds, want in reference.answers:
        try:
            got = model.run(feeds)
        except Exception as exc:  # noqa: BLE001 - an accelerator failing where CPU answers is a difference
            raise LoadError(f"fails on the {name} probe inputs that CPU answers: {_one_line(exc)}") from None
        differs = probes.difference(model.output_names, got, want, rtol=plan.rtol, atol=plan.atol)
        if differs:
            raise LoadError(f"changes the results on the {name} probe inputs: {differs}")
    model.graph_nodes = probes.graph_nodes(model.path)
    model.cpu_nodes = min(on_cpu, model.graph_nodes) if model.graph_nodes else on_cpu
    model.placement = "partial" if on_cpu else "full"
    if reference.problem:
        model.fallback = reference.problem[:1000]


def _candidate(context: _Context, provider: str, options: ort.SessionOptions | None = None,
               after_first: Callable[[LoadedModel], None] | None = None) -> LoadedModel:
    """A session of the model on ``provider`` (and CPU for what it leaves), read and smoke-tested."""
    instances = context.instances if context.instances >= 1 else auto_instances([provider], context.cpus)
    if options is None:
        options = session_options(context.intra_op_threads or instance_threads(instances, context.cpus))
    providers = [provider] if provider == CPU else [provider, CPU]
    provider_options = [dict(context.plan.options.get(p, {})) for p in providers]
    started = time.perf_counter()
    try:
        session = context.factory(str(context.path), options, providers, provider_options)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types for a bad file or a failed compile
        raise LoadError(f"onnxruntime cannot load {context.path.name}: {_one_line(exc)}") from exc
    load_seconds = time.perf_counter() - started
    actual = list(session.get_providers())
    if provider not in actual:
        raise LoadError(f"onnxruntime did not start it (the session runs on {', '.join(actual) or 'nothing'})")
    inputs = [_spec(arg) for arg in session.get_inputs()]
    outputs = [_spec(arg) for arg in session.get_outputs()]
    model = LoadedModel(session=session, path=context.path, provider=provider, providers=actual, inputs=inputs,
                        outputs=outputs, load_seconds=load_seconds, smoke_seconds=0.0, instances=instances)
    _smoke_test(model, after_first)
    return model


def _candidate_profiled(context: _Context, provider: str) -> tuple[LoadedModel, dict[str, int]]:
    """An accelerator candidate whose smoke run is profiled: kernels run, by provider."""
    instances = context.instances if context.instances >= 1 else auto_instances([provider], context.cpus)
    options = session_options(context.intra_op_threads or instance_threads(instances, context.cpus))
    with tempfile.TemporaryDirectory(prefix="edgewise-profile-") as folder:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "run")
        kernels: dict[str, int] = {}

        def first_run_done(model: LoadedModel) -> None:
            profile = Path(model.session.end_profiling())
            try:
                kernels.update(probes.kernels_by_provider(profile))
            except (OSError, ValueError) as exc:
                logger.warning("model %s: the profile of its run on %s cannot be read: %s",
                               context.path.name, provider, exc)

        model = _candidate(context, provider, options, after_first=first_run_done)
    return model, kernels


def _smoke_test(model: LoadedModel, after_first: Callable[[LoadedModel], None] | None = None) -> None:
    """Run the model on made-up inputs (a LoadError if it fails), then warm it up within a small budget."""
    feeds = smoke_inputs(model.inputs)
    started = time.perf_counter()
    try:
        model.run(feeds)
        model.smoke_seconds = model.warm_run_seconds = time.perf_counter() - started
        if after_first is not None:
            after_first(model)
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
    """The error on one line; a long one keeps its start and its end (where onnxruntime's providers say why)."""
    text = " ".join(str(exc).split())
    if len(text) > 800:
        text = f"{text[:250]} … {text[-540:]}"
    return text or type(exc).__name__

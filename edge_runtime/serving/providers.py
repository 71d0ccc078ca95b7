"""Which execution providers a model is tried on, in what order, and what a version says about them.

The order (:func:`select_providers`): the providers a version requires,
then those it prefers, then the node's priority list; each kept only if this
onnxruntime build has it, it computes (not Azure's remote calls), the version
does not forbid it and, when the node was given an explicit list, it is on
that list. CPU always last. :class:`ProviderPlan` holds a version's choices,
checked against the names onnxruntime knows (a misspelling is refused by name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import onnxruntime as ort

from edge_runtime.protocol.providers import (
    CPU,
    NON_COMPUTE_PROVIDERS,
    ProviderNameError,
    check_forbidden,
    check_names,
    check_options,
)
from edge_runtime.serving import probes


class LoadError(Exception):
    """A model could not be loaded or failed its smoke test; the message says why."""


class ProviderError(LoadError):
    """The node lacks, or cannot use, an execution provider the model requires; or a name is misspelled."""


DEFAULT_PROVIDER_PRIORITY: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    CPU,
)
def available_providers() -> list[str]:
    """The compute providers of this ONNX Runtime build, in its own order."""
    return [p for p in ort.get_available_providers() if p not in NON_COMPUTE_PROVIDERS]


def known_providers() -> list[str]:
    """Every provider name this onnxruntime knows of, whether this build has it or not."""
    return list(ort.get_all_providers())


def select_providers(
    *,
    preferred: Sequence[str] = (),
    required: Sequence[str] = (),
    forbidden: Sequence[str] = (),
    priority: Sequence[str] = DEFAULT_PROVIDER_PRIORITY,
    available: Iterable[str] | None = None,
    only: Sequence[str] | None = None,
) -> list[str]:
    """The providers to try, best first, CPU last; ``only``: the node's explicit list, nothing else is used."""
    have = [p for p in (available_providers() if available is None else available)
            if p not in NON_COMPUTE_PROVIDERS and (only is None or p in only or p == CPU)]
    missing = [p for p in required if p not in have]
    if missing:
        raise ProviderError(
            f"the model requires {', '.join(missing)}, which this node lacks "
            f"(it has: {', '.join(have) or 'none'}"
            + (f"; this node is limited to {', '.join(only)})" if only is not None else ")")
        )
    barred = [p for p in required if p in forbidden]
    if barred:
        raise ProviderError(f"the model both requires and forbids {', '.join(barred)}")
    chosen: list[str] = []
    for provider in [*required, *preferred, *priority]:
        if provider in have and provider not in chosen and provider != CPU and provider not in forbidden:
            chosen.append(provider)
    chosen.append(CPU)
    return chosen


@dataclass(frozen=True)
class ProviderPlan:
    """What a version (and the node) says about providers; checked by :meth:`checked`."""

    preferred: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    rtol: float = probes.DEFAULT_RTOL
    atol: float = probes.DEFAULT_ATOL
    # The version's inputs are never NaN or infinite: the probes send none.
    finite_inputs: bool = False

    def checked(self) -> ProviderPlan:
        """The same plan with every name known to onnxruntime; a ProviderError naming the first that is not."""
        known = known_providers()
        try:
            return ProviderPlan(
                preferred=tuple(check_names(self.preferred, "providers", known=known)),
                required=tuple(check_names(self.required, "required_providers", known=known)),
                forbidden=tuple(check_forbidden(self.forbidden, known=known)),
                options=check_options(self.options, known=known), rtol=self.rtol, atol=self.atol,
                finite_inputs=self.finite_inputs)
        except ProviderNameError as exc:
            raise ProviderError(str(exc)) from None

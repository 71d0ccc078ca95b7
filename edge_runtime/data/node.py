"""Plugging the node's model server into the data engine's score step.

:func:`registry_scorer` turns the node's :class:`~edge_runtime.serving.registry.ModelRegistry`
into the :data:`~edge_runtime.data.engine.Scorer` that ``run_query`` calls.
The query names its input columns in order; they are fed to the model as

* one matrix ``[rows, columns]`` when the model has a single input whose
  last dimension is the number of columns (or dynamic), the common tabular
  case; or
* one tensor per input when the model's input names are the column names.

Anything else is an error naming the model's inputs, so the operator can fix
the query. Outputs come back by the model's output names.

The scorer runs the session directly (``run_query`` runs in a worker
thread, ONNX Runtime sessions are safe to share between threads), so a
query never waits in the model server's request queue behind, or in front
of, the site's live inference traffic's batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.data.compute import Array, Scorer

if TYPE_CHECKING:
    from edge_runtime.serving.loader import LoadedModel
    from edge_runtime.serving.registry import ModelRegistry


def model_scorer(resolve: Callable[[str, str | None], LoadedModel]) -> Scorer:
    """A scorer over whatever ``resolve(model, version)`` returns (a loaded model)."""

    def score(model: str, version: str | None, inputs: dict[str, Array]) -> dict[str, Array]:
        from edge_runtime.serving.tensors import OIP_TO_NUMPY

        loaded = resolve(model, version)
        specs = loaded.inputs
        columns = list(inputs)
        rows = len(next(iter(inputs.values()))) if inputs else 0
        feeds: dict[str, Any] = {}
        if len(specs) == 1 and len(specs[0].shape) == 2 and specs[0].shape[1] in (-1, len(columns)):
            spec = specs[0]
            matrix = np.column_stack([inputs[c] for c in columns]) if columns else np.empty((rows, 0))
            feeds[spec.name] = matrix.astype(OIP_TO_NUMPY[spec.datatype], copy=False)
        elif specs and all(s.name in inputs for s in specs):
            for spec in specs:
                values = inputs[spec.name].astype(OIP_TO_NUMPY[spec.datatype], copy=False)
                feeds[spec.name] = values.reshape(rows, 1) if len(spec.shape) == 2 else values
        else:
            wanted = ", ".join(f"{s.name}{list(s.shape)}" for s in specs)
            raise ValueError(f"model {model!r} takes inputs {wanted}; the query gives columns "
                             f"{', '.join(columns)} (give as many columns as its one input has, or name them "
                             "as its inputs)")
        outputs = loaded.run(feeds)
        return dict(zip(loaded.output_names, outputs, strict=True))

    return score


def registry_scorer(registry: ModelRegistry) -> Scorer:
    """The scorer for the models this node serves (the default version when the query names none)."""
    return model_scorer(lambda name, version: registry.get(name, version).model)

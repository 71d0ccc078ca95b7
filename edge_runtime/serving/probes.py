"""What a model is tried on before it serves, and how its answers on two providers are compared.

**Probe inputs** (:func:`probe_inputs`): from the signature, two sets.
``plain`` are small floats and zero integers (valid indices and lengths, so
that a graph steered by its integer inputs stays in range): the smoke test,
which every provider must pass. ``range`` spans each type: floats of large
and small magnitude with a NaN, an infinity and a negative zero among them,
integers up to the type's limits (an INT64 well past 32 bits), both booleans.
An accelerator that cuts INT64 to 32 bits or turns NaN into a number answers
``range`` differently from CPU (a version whose inputs are never NaN or
infinite says so, ``finite_inputs``, and is probed without them); a model that cannot take ``range`` at all (on
CPU too: an index out of bounds) is compared on ``plain`` only.

**Comparison** (:func:`difference`): each output's shape and dtype must be the
same; integers, booleans and strings equal; floats within ``rtol``/``atol``
with NaN where, and only where, CPU has NaN.

**Where a graph ran** (:func:`kernels_by_provider`): onnxruntime's profile of
one run lists each kernel it ran with the provider that ran it; an
accelerator's fused subgraph is one kernel. :func:`graph_nodes` counts the
model file's nodes (a protobuf walk: the node has no ``onnx`` package).
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.serving.tensors import OIP_TO_NUMPY, Array

if TYPE_CHECKING:
    from edge_runtime.serving.loader import TensorSpec

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
# Kernels onnxruntime adds to move tensors between devices: not nodes of the model.
_COPY_OPS = frozenset({"MemcpyToHost", "MemcpyFromHost"})


def _shape(spec: TensorSpec) -> tuple[int, ...]:
    return tuple(1 if d < 0 else d for d in spec.shape)


def plain_inputs(specs: Sequence[TensorSpec], seed: int = 0) -> dict[str, Array]:
    """Small random floats, zeros otherwise, dynamic dimensions 1: the smoke test's inputs."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, Array] = {}
    for spec in specs:
        shape = _shape(spec)
        dtype = OIP_TO_NUMPY[spec.datatype]
        if spec.datatype == "BYTES":
            feeds[spec.name] = np.full(shape, "", dtype=object)
        elif dtype.kind == "f":
            feeds[spec.name] = rng.uniform(-0.1, 0.1, size=shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _spread(dtype: np.dtype, count: int, rng: np.random.Generator, finite: bool) -> Array:
    """``count`` values across the range of ``dtype``, its awkward ones first (no NaN or inf if ``finite``)."""
    if dtype.kind == "f":
        awkward = [] if finite else [np.nan, np.inf]
        special = np.array([*awkward, -0.0, 1e30 if dtype.itemsize > 2 else 6e4, -3.5, 1e-30], dtype=np.float64)
        values = np.concatenate([special, rng.normal(0, 100, size=max(count, 1))])
        with np.errstate(over="ignore", under="ignore"):
            return values[:count].astype(dtype)
    if dtype.kind == "b":
        return (np.arange(count) % 2).astype(bool)
    info = np.iinfo(dtype)
    edges = [info.max, info.min, 2**40 + 7 if info.bits == 64 else info.max // 3, 1, 0]
    values = np.array([v for v in edges if info.min <= v <= info.max], dtype=dtype)
    tail = rng.integers(info.min, info.max, size=max(count, 1), dtype=dtype, endpoint=True)
    return np.concatenate([values, tail])[:count]


def range_inputs(specs: Sequence[TensorSpec], seed: int = 1, *, finite: bool = False) -> dict[str, Array]:
    """Each type's range, including large INT64 and NaN where the type allows; dynamic dimensions 4.

    ``finite``: the version says its inputs are never NaN or infinite, so none are sent.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, Array] = {}
    for spec in specs:
        shape = tuple(4 if d < 0 else d for d in spec.shape)
        if spec.datatype == "BYTES":
            feeds[spec.name] = np.full(shape, "edgewise", dtype=object)
            continue
        count = int(np.prod(shape)) if shape else 1
        feeds[spec.name] = _spread(OIP_TO_NUMPY[spec.datatype], count, rng, finite).reshape(shape)
    return feeds


def probe_inputs(specs: Sequence[TensorSpec], *, finite: bool = False) -> list[tuple[str, dict[str, Array]]]:
    return [("plain", plain_inputs(specs)), ("range", range_inputs(specs, finite=finite))]


def difference(names: Sequence[str], got: Sequence[Array], want: Sequence[Array], *, rtol: float,
               atol: float) -> str | None:
    """What differs between outputs ``got`` and the reference ``want`` (first output that does), or None."""
    for name, a, b in zip(names, got, want, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return f"output '{name}' has shape {list(a.shape)}, not {list(b.shape)}"
        if a.dtype != b.dtype:
            return f"output '{name}' is {a.dtype}, not {b.dtype}"
        if b.dtype.kind == "f":
            nan_a, nan_b = np.isnan(a), np.isnan(b)
            if not np.array_equal(nan_a, nan_b):
                return (f"output '{name}' has {int(nan_a.sum())} NaN where CPU has {int(nan_b.sum())} "
                        "(at other places)")
            close = np.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
            if not close.all():
                i = int(np.argmin(close.reshape(-1)))
                return (f"output '{name}' differs beyond rtol {rtol:g} atol {atol:g}: "
                        f"{a.reshape(-1)[i]!r} where CPU gives {b.reshape(-1)[i]!r}")
        elif not np.array_equal(a, b):
            i = int(np.argmin((a == b).reshape(-1)))
            return f"output '{name}' differs: {a.reshape(-1)[i]!r} where CPU gives {b.reshape(-1)[i]!r}"
    return None


def kernels_by_provider(profile: Path) -> dict[str, int]:
    """Kernels of one profiled run, counted by the provider that ran them (copies between devices left out)."""
    events = json.loads(profile.read_bytes())
    counts: dict[str, int] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        args = event.get("args") or {}
        if args.get("op_name") in _COPY_OPS:
            continue
        provider = str(args.get("provider") or "")
        counts[provider] = counts.get(provider, 0) + 1
    return counts


def _varint(data: mmap.mmap | bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(data: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in ``data[start:end]``; others skipped."""
    at = start
    while at < end:
        key, at = _varint(data, at)
        wire = key & 7
        if wire == 0:
            _, at = _varint(data, at)
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == 2:
            length, at = _varint(data, at)
            yield key >> 3, at, at + length
            at += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def graph_nodes(path: Path) -> int:
    """Nodes of the model's main graph (ModelProto.graph = 7, GraphProto.node = 1); 0 if unreadable."""
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for number, start, end in _fields(data, 0, len(data)):
                if number == 7:
                    return sum(1 for n, _, _ in _fields(data, start, end) if n == 1)
    except (OSError, ValueError, IndexError):
        return 0
    return 0

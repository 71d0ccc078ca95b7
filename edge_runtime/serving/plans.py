"""What the request path works out once per served version and reuses: parsed request layouts, answer parts.

Clients send the same few request shapes again and again. For each one the
model server checks the request once, fully, and keeps what it found:

* :class:`RequestPlan`: a binary request's JSON header, keyed by its bytes;
  a later request with the same header has only its tensor bytes read.
* :class:`JsonPlan`: a JSON request's layout (names, datatypes, shapes);
  a later request of the same layout is converted without the checks, and
  anything else takes the full path with its errors.
* :class:`JsonOutputs`: the fixed parts of a JSON plan's answers.

The caches live on each :class:`~edge_runtime.serving.registry.ServedVersion`
(``request_plans``, ``answer_heads``) and go with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.serving.tensors import ORJSON_ARRAY_TYPES, Array, json_bytes

if TYPE_CHECKING:
    from edge_runtime.serving.registry import ServedVersion


# Entries each cache keeps at most; past it, it starts again (clients reuse a handful of request shapes).
CACHE_ENTRIES = 64


def remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= CACHE_ENTRIES:
        cache.clear()
    cache[key] = value


class RequestPlan:
    """A binary request's header, parsed and checked once: where each input's bytes are and what they are."""

    __slots__ = ("request", "wanted", "size", "inputs")

    def __init__(self, request: dict[str, Any], feeds: dict[str, Array], wanted: list[tuple[str, bool]],
                 size: int) -> None:
        self.request = request
        self.wanted = wanted
        self.size = size
        self.inputs = [(name, a.dtype, a.shape, a.nbytes) for name, a in feeds.items()]

    def feeds(self, binary: memoryview) -> dict[str, Array]:
        out: dict[str, Array] = {}
        offset = 0
        for name, dtype, shape, size in self.inputs:
            out[name] = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
            offset += size
        return out


class JsonPlan:
    """A JSON request's layout, checked once.

    It covers requests whose inputs have a name, shape, datatype and flat
    numeric data, and that have no other field but an id.

    A later request of the same layout (names, types, shapes) is converted
    without the checks; anything else takes the full path, and its errors.
    """

    __slots__ = ("key", "inputs", "wanted")

    def __init__(self, key: tuple[Any, ...], feeds: dict[str, Array], wanted: list[tuple[str, bool]]) -> None:
        self.key = key
        self.wanted = JsonOutputs(wanted)
        self.inputs = [(name, a.dtype, a.size, a.shape) for name, a in feeds.items()]

    @classmethod
    def of(cls, request: dict[str, Any], feeds: dict[str, Array], wanted: list[tuple[str, bool]]) -> JsonPlan | None:
        """The plan of a request that the full path accepted, if it has a plannable layout."""
        if any(a.dtype.kind != "f" for a in feeds.values()):
            return None  # integers and booleans keep their value checks
        key = json_layout(request)
        if key is None:
            return None
        return cls(key, feeds, wanted)


class JsonOutputs(list[tuple[str, bool]]):
    """A JSON plan's outputs (every one, as JSON), with the fixed parts of its answers once built.

    The answer is then those parts, each output's shape and its numbers: the
    same bytes as :func:`~edge_runtime.serving.answer.respond_whole` writes, without building and
    serialising the dictionaries around them for every request.
    """

    __slots__ = ("parts",)

    def __init__(self, wanted: list[tuple[str, bool]]) -> None:
        super().__init__(wanted)
        self.parts: tuple[bytes, list[bytes]] | None = None

    def answer(self, served: ServedVersion, request: dict[str, Any], outputs: list[Array]) -> bytes | None:
        """The answer's body; None when an output is not a plain numeric array or holds NaN or Infinity."""
        parts = self.parts
        if parts is None:
            specs = served.model.outputs
            parts = self.parts = (
                b'{"model_name":' + json_bytes(served.name) + b',"model_version":' + json_bytes(served.version),
                [b'{"name":' + json_bytes(spec.name) + b',"datatype":' + json_bytes(spec.datatype) + b',"shape":'
                 for spec in specs],
            )
        head, tensors = parts
        pieces = [head, b',"id":', json_bytes(request["id"]), b',"outputs":['] if "id" in request else \
            [head, b',"outputs":[']
        for i, array in enumerate(outputs):
            if array.dtype not in ORJSON_ARRAY_TYPES:
                return None
            data = json_bytes(array.ravel())
            if array.dtype.kind == "f" and b"null" in data:
                return None  # NaN or Infinity, which orjson writes as null
            pieces += (b"," if i else b"", tensors[i], json_bytes(array.shape), b',"data":', data, b"}")
        pieces.append(b"]}")
        return b"".join(pieces)


# Inputs of at most this many numbers are converted with np.array, larger ones with np.fromiter.
SMALL_TENSOR = 1024
# Marks the cache keys of JSON requests (the others are a binary request's header).
_JSON = object()


def json_layout(request: dict[str, Any]) -> tuple[Any, ...] | None:
    """(_JSON, (name, datatype, shape), ...) of a request of plain flat tensors, or None."""
    # Plain checks, no set comparisons: this runs for every JSON request.
    fields = len(request)
    if fields != 1 and not (fields == 2 and type(request.get("id")) is str):
        return None
    inputs = request.get("inputs")
    if type(inputs) is not list:
        return None
    key: list[Any] = [_JSON]
    for tensor in inputs:
        if type(tensor) is not dict or len(tensor) != 4:
            return None
        try:
            shape, data, name, datatype = tensor["shape"], tensor["data"], tensor["name"], tensor["datatype"]
        except KeyError:
            return None
        if (type(shape) is not list or type(data) is not list or not data or type(data[0]) is list
                or type(name) is not str or type(datatype) is not str):
            return None
        for d in shape:
            if type(d) is not int:
                return None
        key.append((name, datatype, tuple(shape)))
    return tuple(key)


def json_plan_feeds(served: ServedVersion, request: dict[str, Any]
                     ) -> tuple[dict[str, Array], list[tuple[str, bool]]] | None:
    """A JSON request's feeds through the plan for its layout; None if it has none (or does not fit it)."""
    key = json_layout(request)
    if key is None:
        return None
    plan = served.request_plans.get(key)
    if plan is None:
        return None
    feeds: dict[str, Array] = {}
    for tensor, (name, dtype, size, shape) in zip(request["inputs"], plan.inputs, strict=True):
        data = tensor["data"]
        if len(data) != size:
            return None
        if size > SMALL_TENSOR:
            try:
                feeds[name] = np.fromiter(data, dtype=dtype, count=size).reshape(shape)
            except (TypeError, ValueError, OverflowError):
                return None  # the full path names the problem
        else:
            # Twice as fast as fromiter on a few dozen numbers; anything but plain numbers
            # (a string, null, a nested list) gives another kind of array: the full path then.
            try:
                array = np.array(data)
            except (TypeError, ValueError):  # a list among the numbers, say
                return None
            if array.dtype.kind not in "fiub" or array.ndim != 1:
                return None
            feeds[name] = array.astype(dtype, copy=False).reshape(shape)
    return feeds, plan.wanted

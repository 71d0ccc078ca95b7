"""Tensors on the wire: Open Inference Protocol datatypes, JSON and binary forms.

The OIP (KServe v2) names element types ``BOOL``, ``UINT8`` ... ``FP64`` and
``BYTES``; ONNX Runtime names them ``tensor(float)`` and so on. A request
tensor is either JSON (``data`` flat or nested, row-major) or, with the
binary tensor data extension, raw little-endian bytes after the JSON header
(``parameters.binary_data_size``). ``BYTES`` elements travel in binary as a
4-byte little-endian length followed by the bytes, one after the other.

Every problem raises :class:`TensorError` with a message that names the
tensor and what is wrong; the server turns it into a 400.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

# ONNX Runtime's type strings -> OIP datatypes.
ORT_TO_OIP: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# OIP datatypes -> numpy dtypes, little-endian as the binary extension requires.
OIP_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

NUMPY_KIND_TO_OIP: dict[str, str] = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}

Array = npt.NDArray[Any]


class TensorError(ValueError):
    """A tensor in a request is malformed; the message names it and the problem."""


def oip_datatype(ort_type: str) -> str:
    try:
        return ORT_TO_OIP[ort_type]
    except KeyError:
        raise TensorError(f"element type {ort_type} has no Open Inference Protocol datatype") from None


def datatype_of(array: Array) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    try:
        return NUMPY_KIND_TO_OIP[array.dtype.name]
    except KeyError:
        raise TensorError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype") from None


def _element_count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def check_shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise TensorError(f"input '{name}': shape must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise TensorError(f"input '{name}': shape {shape} has a negative dimension")
    return shape


def _flatten(name: str, data: Any) -> Any:
    # Nested lists are allowed by the protocol; flatten one level at a time
    # only when needed so that the common flat case costs nothing.
    if data and type(data[0]) is list:
        flat: list[Any] = []
        stack = [data]
        while stack:
            item = stack.pop()
            if type(item) is not list:
                raise TensorError(f"input '{name}': nested data mixes lists and values at the same level")
            if item and type(item[0]) is list:
                stack.extend(reversed(item))
            else:
                flat.extend(item)
        return flat
    return data


def _to_bytes_element(name: str, value: Any) -> str:
    # ONNX string tensors hold UTF-8 text, which onnxruntime takes as str.
    if isinstance(value, str):
        return value
    raise TensorError(f"input '{name}': BYTES elements must be strings, got {type(value).__name__}")


def from_json(name: str, datatype: str, shape: list[int], data: Any) -> Array:
    """The array that a JSON tensor (``data`` flat or nested) describes."""
    dtype = OIP_TO_NUMPY.get(datatype)
    if dtype is None:
        raise TensorError(f"input '{name}': unknown datatype {datatype!r}")
    if not isinstance(data, list):
        data = [data]
    flat = _flatten(name, data)
    expected = _element_count(shape)
    if len(flat) != expected:
        raise TensorError(f"input '{name}': shape {shape} needs {expected} elements, data has {len(flat)}")
    if datatype == "BYTES":
        items = [_to_bytes_element(name, v) for v in flat]
        try:
            # One pass in C: an unpaired surrogate (which JSON's \u escapes can write) is not UTF-8 text.
            "".join(items).encode()
        except UnicodeEncodeError:
            raise TensorError(f"input '{name}': BYTES elements must be UTF-8 text (one holds an unpaired "
                              "surrogate)") from None
        array = np.empty(len(flat), dtype=object)
        array[:] = items
        return array.reshape(shape)
    try:
        if datatype == "BOOL":
            if not all(isinstance(v, bool) for v in flat):
                raise TensorError(f"input '{name}': BOOL data must be true or false")
            array = np.array(flat, dtype=dtype)
        else:
            # fromiter with a known count converts straight into the buffer,
            # about a fifth faster than np.array on thousands of numbers.
            array = np.fromiter(flat, dtype=dtype, count=len(flat))
            if dtype.kind in "iu" and any(isinstance(v, float) for v in flat):
                raise TensorError(f"input '{name}': {datatype} data must be integers")
        return array.reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, TensorError):
            raise
        raise TensorError(f"input '{name}': data is not {datatype}: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def from_binary(name: str, datatype: str, shape: list[int], raw: bytes | memoryview) -> Array:
    """The array that raw little-endian bytes (binary tensor extension) hold.

    Numeric arrays are views of the request body (no copy); onnxruntime
    only reads its inputs.
    """
    dtype = OIP_TO_NUMPY.get(datatype)
    if dtype is None:
        raise TensorError(f"input '{name}': unknown datatype {datatype!r}")
    expected = _element_count(shape)
    if datatype == "BYTES":
        return _bytes_from_binary(name, shape, expected, bytes(raw))
    if len(raw) != expected * dtype.itemsize:
        raise TensorError(f"input '{name}': shape {shape} of {datatype} needs {expected * dtype.itemsize} bytes, "
                          f"binary_data_size is {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _bytes_from_binary(name: str, shape: list[int], expected: int, raw: bytes) -> Array:
    items: list[str] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise TensorError(f"input '{name}': BYTES data ends inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorError(f"input '{name}': BYTES element {len(items)} runs past the end of its data")
        try:
            items.append(raw[offset:offset + length].decode())
        except UnicodeDecodeError:
            raise TensorError(f"input '{name}': BYTES element {len(items)} is not UTF-8 text") from None
        offset += length
    if len(items) != expected:
        raise TensorError(f"input '{name}': shape {shape} needs {expected} elements, data has {len(items)}")
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def to_json_data(array: Array) -> list[Any]:
    """The flat, row-major JSON form of an output tensor."""
    if array.dtype == object or array.dtype.kind in "SU":
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in array.ravel().tolist()]
    return list(array.ravel().tolist())


# How a float output's non-finite elements are written in JSON, which has no NaN or Infinity: the strings
# of protobuf's JSON mapping (which KServe's gRPC and REST share), which numpy and tritonclient read back.
NON_FINITE_JSON = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def to_json_data_safe(array: Array) -> list[Any]:
    """:func:`to_json_data`, with a float array's NaN and Infinity as strings (see ``NON_FINITE_JSON``).

    The finite elements keep their shortest exact form (a float32's as float32), as orjson writes them.
    """
    if array.dtype.kind != "f":
        return to_json_data(array)
    flat = array.ravel()
    # str() of a float32 or float16 element is its shortest exact form; float() of it writes the same.
    values: list[Any] = flat.tolist() if flat.dtype == np.float64 else [float(str(v)) for v in flat]
    for i in np.flatnonzero(~np.isfinite(flat)).tolist():
        values[i] = NON_FINITE_JSON[str(float(values[i]))]
    return values


def to_binary(array: Array) -> bytes:
    """The raw little-endian bytes of an output tensor (binary tensor extension)."""
    if array.dtype == object or array.dtype.kind in "SU":
        parts: list[bytes] = []
        for v in array.ravel().tolist():
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


# Arrays orjson writes itself (native byte order; the widths ONNX tensors have).
ORJSON_ARRAY_TYPES = frozenset(np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64,
))


def json_bytes(data: Any) -> bytes:
    """``data`` as JSON; numpy arrays written by orjson itself (NaN and Infinity as null)."""
    return orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)

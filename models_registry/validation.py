"""The checks a model version passes before it can be signed and deployed.

Pure functions over a file on disk; no database. :func:`validate_artifact`
runs every step in order and stops at the first failure, returning a log of
``{"step", "ok", "detail"}`` entries whose last failing entry says exactly
what is wrong.

Decisions written down here:

- An artifact is **one self-contained file**. A tensor whose data lives in an
  external file is refused: with an absolute path or one that escapes the
  model's folder (``..``) as an attack, otherwise because the registry stores
  and ships single files only (re-save with ``save_as_external_data=False``).
- The supported opset range is what the installed onnxruntime actually loads,
  probed once per process, not a table that goes stale.
- The int8 variant is optional: a model with nothing to quantize, or one the
  quantizer cannot handle, stays valid without a variant (the log says why).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, helper

# onnxruntime's type strings → Open Inference Protocol datatypes.
OIP_DATATYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}
_NUMPY = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8, "INT16": np.int16,
    "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "BOOL": np.bool_,
}
DEFAULT_DOMAINS = {"", "ai.onnx"}
CPU = ["CPUExecutionProvider"]


class StepFailed(Exception):
    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail


@dataclasses.dataclass
class Variant:
    kind: str
    path: Path
    max_abs_diff: float


@dataclasses.dataclass
class ValidationResult:
    ok: bool
    log: list[dict[str, Any]]
    opset: int | None = None
    inputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    variant: Variant | None = None

    @property
    def error(self) -> str:
        failed = [e for e in self.log if not e["ok"] and e.get("fatal", True)]
        return f"{failed[-1]['step']}: {failed[-1]['detail']}" if failed else ""


@functools.cache
def supported_opsets() -> tuple[int, int]:
    """(lowest, highest) default-domain opset the installed onnxruntime loads."""
    highest = 7
    for candidate in range(onnx.defs.onnx_opset_version(), 6, -1):
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", candidate)])
        probe.ir_version = min(probe.ir_version, onnx.IR_VERSION)
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=CPU)
        except Exception:  # noqa: BLE001, S112 - "not supported" is exactly what is probed
            continue
        highest = candidate
        break
    # onnxruntime loads opset 7 and later.
    return 7, highest


def _load(path: Path) -> onnx.ModelProto:
    if path.stat().st_size == 0:
        raise StepFailed("parse", "the file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for bad bytes
        raise StepFailed(
            "parse",
            f"the file is not an ONNX model, or it is truncated or corrupt (it does not parse as an ONNX "
            f"ModelProto: {exc})",
        ) from exc
    if model.ir_version <= 0 or not model.HasField("graph"):
        # Some non-ONNX bytes happen to parse as an (almost empty) protobuf message.
        raise StepFailed("parse", "the file is not an ONNX model (it holds no IR version or graph)")
    return model


def _escapes(location: str) -> bool:
    if not location:
        return True
    if location.startswith(("/", "\\")) or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive:
        return True
    parts = PurePosixPath(location.replace("\\", "/")).parts
    return ".." in parts


def check_external_data(model: onnx.ModelProto) -> None:
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if _escapes(location):
            raise StepFailed(
                "external data",
                f"tensor {tensor.name!r} points its external data at {location!r}, which is outside the "
                "model's folder; refused",
            )
        raise StepFailed(
            "external data",
            f"tensor {tensor.name!r} keeps its data in a separate file {location!r}; upload one self-contained "
            "file (save with onnx.save(model, path, save_as_external_data=False))",
        )


def _check(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - the checker's message is what the uploader needs
        raise StepFailed("onnx checker", f"the model is not valid ONNX: {exc}") from exc


def _opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    if not versions:
        raise StepFailed("opset", "the model imports no ai.onnx opset")
    opset = max(versions)
    low, high = supported_opsets()
    if not low <= opset <= high:
        raise StepFailed(
            "opset",
            f"the model uses ai.onnx opset {opset}; the installed onnxruntime {ort.__version__} "
            f"supports opsets {low} to {high}",
        )
    return opset


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=CPU)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise StepFailed("load", f"onnxruntime could not load the model: {exc}") from exc


def _describe(args: list[Any], kind: str) -> list[dict[str, Any]]:
    described = []
    for arg in args:
        datatype = OIP_DATATYPES.get(arg.type)
        if datatype is None:
            raise StepFailed(
                "signature",
                f"{kind} {arg.name!r} has type {arg.type}, which the Open Inference Protocol cannot carry "
                "(only tensors can; for scikit-learn classifiers convert with zipmap disabled)",
            )
        shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
        described.append({"name": arg.name, "datatype": datatype, "shape": shape})
    return described


def smoke_inputs(inputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Deterministic inputs for every input, dynamic dimensions set to 1."""
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = [1 if d < 0 else d for d in spec["shape"]]
        datatype = spec["datatype"]
        if datatype == "BYTES":
            feeds[spec["name"]] = np.full(shape, "a", dtype=object)
        elif datatype == "BOOL":
            feeds[spec["name"]] = np.zeros(shape, dtype=np.bool_)
        elif datatype.startswith(("FP", "BF")):
            feeds[spec["name"]] = rng.standard_normal(shape).astype(_NUMPY.get(datatype, np.float32))
        else:
            # Zeros are a valid index for any lookup an integer input feeds.
            feeds[spec["name"]] = np.zeros(shape, dtype=_NUMPY[datatype])
    return feeds


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[Any]:
    try:
        return list(session.run(None, feeds))
    except Exception as exc:  # noqa: BLE001
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        raise StepFailed("smoke inference", f"inference on generated inputs ({shapes}) failed: {exc}") from exc


def max_abs_diff(a: list[Any], b: list[Any]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x_arr, y_arr = np.asarray(x), np.asarray(y)
        if x_arr.dtype.kind in "fc" or y_arr.dtype.kind in "fc":
            if x_arr.size:
                worst = max(worst, float(np.max(np.abs(x_arr.astype(np.float64) - y_arr.astype(np.float64)))))
        elif not np.array_equal(x_arr, y_arr):
            worst = max(worst, float(np.max(np.abs(x_arr.astype(np.float64) - y_arr.astype(np.float64)))))
    return worst


def _quantize(path: Path, feeds: dict[str, np.ndarray], reference: list[Any], workdir: Path) -> Variant:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = workdir / "int8.onnx"
    try:
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    except Exception as exc:  # noqa: BLE001
        raise StepFailed("quantize int8", f"dynamic quantization failed: {exc}") from exc
    quantized = onnx.load(str(out), load_external_data=False)
    if not any("Integer" in n.op_type or "Quantize" in n.op_type for n in quantized.graph.node):
        raise StepFailed("quantize int8", "nothing to quantize (no MatMul/Gemm/Conv weights); no variant made")
    session = _session(out)
    outputs = _run(session, feeds)
    return Variant(kind="int8", path=out, max_abs_diff=max_abs_diff(reference, outputs))


def validate_artifact(path: Path, *, allow_quantized: bool, workdir: Path | None = None) -> ValidationResult:
    """Run every check on the file at ``path``. ``workdir`` receives a variant file, if any."""
    log: list[dict[str, Any]] = []
    result = ValidationResult(ok=False, log=log)

    def passed(step: str, detail: str) -> None:
        log.append({"step": step, "ok": True, "detail": detail})

    try:
        model = _load(path)
        passed("parse", f"ONNX IR version {model.ir_version}, producer {model.producer_name or 'unknown'}")
        check_external_data(model)
        passed("external data", "all tensor data is inside the file")
        _check(model)
        passed("onnx checker", "the graph is well-formed")
        result.opset = _opset(model)
        low, high = supported_opsets()
        passed("opset", f"ai.onnx opset {result.opset} (onnxruntime {ort.__version__} supports {low}–{high})")
        del model
        session = _session(path)
        passed("load", "onnxruntime loads it on CPUExecutionProvider")
        result.inputs = _describe(session.get_inputs(), "input")
        result.outputs = _describe(session.get_outputs(), "output")
        passed("signature", f"{len(result.inputs)} input(s), {len(result.outputs)} output(s)")
        feeds = smoke_inputs(result.inputs)
        reference = _run(session, feeds)
        passed("smoke inference", "ran on generated inputs: " + ", ".join(
            f"{o['name']}{list(np.asarray(v).shape)}" for o, v in zip(result.outputs, reference, strict=True)))
    except StepFailed as exc:
        log.append({"step": exc.step, "ok": False, "detail": exc.detail})
        return result
    result.ok = True
    if allow_quantized:
        own_dir = workdir or Path(tempfile.mkdtemp(prefix="edgewise-quant-"))
        try:
            result.variant = _quantize(path, feeds, reference, own_dir)
            passed("quantize int8", f"int8 variant, max |Δ| {result.variant.max_abs_diff:.6g} on the smoke inputs")
        except StepFailed as exc:
            # Not fatal: the original still serves everywhere.
            log.append({"step": exc.step, "ok": False, "fatal": False, "detail": exc.detail})
    return result


def cleanup(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

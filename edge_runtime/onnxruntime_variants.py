"""Which onnxruntime build this environment has, checked before anything needs it.

onnxruntime ships as several distributions that are mutually exclusive and
all install the same ``onnxruntime`` package: the stock CPU build
(``onnxruntime``), NVIDIA's CUDA and TensorRT (``onnxruntime-gpu``), Intel's
OpenVINO (``onnxruntime-openvino``), Windows' DirectML
(``onnxruntime-directml``). The edge runtime therefore requires none of them
directly: ``edge_runtime/pyproject.toml`` has one extra per variant
(:data:`VARIANTS`), and a node installs exactly one of them.

* :func:`require_onnxruntime` is the cheap check that an ``onnxruntime``
  package is importable at all; ``edge-runtime`` runs it before any command
  and :mod:`edge_runtime.serving` before it imports onnxruntime, so a node
  without a variant stops with the extras to install instead of a traceback.
* :func:`check_onnxruntime` also reads the installed distributions (a tenth of
  a second), for ``edge-runtime run`` and ``serve``: two of them at once have
  overwritten each other's files, and which build then runs is anyone's guess.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

# extra of edge-runtime -> the distribution it installs (the same table as edge_runtime/pyproject.toml's extras).
VARIANTS: dict[str, str] = {
    "cpu": "onnxruntime",
    "gpu": "onnxruntime-gpu",
    "openvino": "onnxruntime-openvino",
    "directml": "onnxruntime-directml",
}
PACKAGE = "onnxruntime"


class OnnxRuntimeError(ImportError):
    """No usable onnxruntime in this environment; the message says what to install."""


def install_hint() -> str:
    extras = ", ".join(f"{extra} ({dist})" for extra, dist in VARIANTS.items())
    return (f"install exactly one variant as an extra of the edge runtime, e.g. pip install 'edge-runtime[cpu]' "
            f"(extras: {extras}), or run the site's installer again (sh edgewise-install-<site>.sh "
            "--onnxruntime cpu|gpu|openvino|auto)")


def require_onnxruntime() -> None:
    """Raise :class:`OnnxRuntimeError` unless an ``onnxruntime`` package can be imported."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    # No origin: a folder left behind by an uninstall, a namespace package with no onnxruntime in it.
    if spec is None or spec.origin is None:
        raise OnnxRuntimeError(f"no onnxruntime is installed in this environment; {install_hint()}")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def onnxruntime_distributions() -> list[str]:
    """The installed distributions that provide the ``onnxruntime`` package, normalized names, sorted."""
    return sorted({_normalized(d) for d in importlib.metadata.packages_distributions().get(PACKAGE, [])})


def check_onnxruntime() -> str:
    """The distribution that provides onnxruntime here; :class:`OnnxRuntimeError` if none or several do."""
    require_onnxruntime()
    found = onnxruntime_distributions()
    if len(found) > 1:
        raise OnnxRuntimeError(
            f"several onnxruntime distributions are installed at once ({', '.join(found)}): they overwrite each "
            "other's files, so which build runs is undefined; uninstall all of them "
            f"(pip uninstall -y {' '.join(found)}) and {install_hint()}")
    # A build without metadata (copied in by hand) is used as it is.
    return found[0] if found else PACKAGE


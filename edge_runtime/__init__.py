"""Edgewise edge runtime: the agent, model server, data engine, policy and audit
that run on every node of every site.

This package stands alone: it never imports Django, so it can be installed at a
site from the wheel that the control plane serves, with only its own
dependencies (``REQUIRES`` below, mirrored by the ``edge`` extra in the
repository's ``pyproject.toml``).
"""

from __future__ import annotations

__version__ = "0.1.0"

# What a site needs to run this package. The control plane writes these into
# the wheel it builds and serves; tests check they match pyproject's ``edge``
# extra so the two never drift apart.
REQUIRES: tuple[str, ...] = (
    "httpx>=0.27",
    "cryptography>=42",
    "pydantic>=2.6",
    "websockets>=12",
    "onnxruntime>=1.18",
    "numpy>=1.26",
    "httptools>=0.6",  # the model server's HTTP parser (llhttp)
    "uvloop>=0.19; sys_platform != 'win32'",  # the faster event loop, where it exists
    "pandas>=2.2",  # the data engine: federated queries computed in place on local datasets
    "pyarrow>=15",  # Parquet datasets, read with column selection and filter pushdown
    "orjson>=3.10",  # the model server's JSON: tensors parsed and written several times faster than json
)

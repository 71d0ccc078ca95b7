"""Edgewise edge runtime: the agent, model server, data engine, policy and audit
that run on every node of every site.

This package stands alone: it never imports Django, so it can be installed at a
site from the wheel that the control plane serves, with only its own
dependencies. They are written once, in this folder's ``pyproject.toml`` (the
``edge-runtime`` distribution), which the control plane also reads to build
that wheel.
"""

from __future__ import annotations

# The one place the version is written: the pyproject and the wheel read it here.
__version__ = "0.1.0"

"""``python -m edge_runtime``: the same as the ``edge-runtime`` command."""

from __future__ import annotations

from edge_runtime.cli import main

raise SystemExit(main())

"""``edge-runtime import-bundle``: a bundle in from the control plane, verified and queued for the agent.

Exit status 0 when the bundle passed every check (the running agent, or the
next ``run``, applies it), 1 with the reason when it was refused: nothing of
a refused bundle is kept, and the node goes on as it was.
"""

from __future__ import annotations

import argparse
import json

from edge_runtime.airgap.bundle import BundleRefused
from edge_runtime.airgap.inbound import import_bundle
from edge_runtime.cli.common import CliError
from edge_runtime.state import StateDir


def cmd_import_bundle(args: argparse.Namespace) -> int:
    state = StateDir(args.state_dir)
    if not state.has_identity():
        raise CliError(f"{state.path} holds no enrolled node: enroll first")
    try:
        imported = import_bundle(state, args.file)
    except BundleRefused as exc:
        raise CliError(f"refused {args.file}: {exc}") from None
    if args.json:
        print(json.dumps({"sequence": imported.sequence, "site": imported.site, "generation": imported.generation,
                          "made_at": imported.made_at.isoformat(), "artifacts": imported.artifacts,
                          "queries": imported.queries, "warning": imported.warning}))
        return 0
    print(f"bundle {imported.sequence} for site {imported.site} (made {imported.made_at:%Y-%m-%d %H:%M} UTC) "
          f"verified: desired generation {imported.generation}, {len(imported.artifacts)} artifact(s), "
          f"{imported.queries} query(ies); the agent applies it")
    if imported.warning:
        print(f"warning: {imported.warning}")
    return 0

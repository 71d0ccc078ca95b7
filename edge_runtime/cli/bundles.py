"""``edge-runtime import-bundle`` and ``export-bundle``: the two ends of an air gap at a node.

``import-bundle``: exit status 0 when the bundle passed every check (the
running agent, or the next ``run``, applies it), 1 with the reason when it
was refused: nothing of a refused bundle is kept, and the node goes on as it was.

``export-bundle``: the node's next bundle out (everything the control plane
has not acknowledged), signed with its identity key; safe beside the
running agent.
"""

from __future__ import annotations

import argparse
import json

from edge_runtime.airgap.bundle import BundleRefused
from edge_runtime.airgap.inbound import import_bundle
from edge_runtime.airgap.outbound import export_bundle
from edge_runtime.cli.common import CliError
from edge_runtime.state import StateDir, StateError


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


def cmd_export_bundle(args: argparse.Namespace) -> int:
    state = StateDir(args.state_dir)
    if not state.has_identity():
        raise CliError(f"{state.path} holds no enrolled node: enroll first")
    if args.file.exists() or args.file.with_name(args.file.name + ".001").exists():
        raise CliError(f"{args.file} exists already: a bundle is never overwritten")
    if not args.file.parent.is_dir():
        raise CliError(f"{args.file.parent} is not a directory")
    try:
        exported = export_bundle(state, args.file, part_size=args.part_size)
    except (StateError, OSError, ValueError) as exc:
        raise CliError(f"cannot export a bundle: {exc}") from None
    if args.json:
        print(json.dumps({"sequence": exported.sequence, "files": [str(p) for p in exported.paths],
                          "audit_entries": exported.audit_entries, "telemetry_items": exported.telemetry_items,
                          "answers": exported.answers, "artifacts": exported.artifacts, "notes": exported.notes}))
        return 0
    files = ", ".join(p.name for p in exported.paths)
    print(f"bundle out {exported.sequence} written to {files}: {exported.audit_entries} audit entries, "
          f"{exported.telemetry_items} telemetry item(s), {exported.answers} query answer(s), "
          f"{exported.artifacts} artifact(s) held; upload it in the console or with manage.py bundle_import")
    for note in exported.notes:
        print(f"note: {note}")
    return 0

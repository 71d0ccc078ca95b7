"""``edge-runtime``: enroll this machine as a node, run the agent, show its status.

::

    edge-runtime enroll --url URL [--token-stdin | --token TOKEN] [--fingerprint HEX]
                        [--name NAME] [--role device|gateway|server] [--state-dir DIR] [--force]
    edge-runtime run [--state-dir DIR] [--log-level LEVEL]
                     [--telemetry-interval SECONDS] [--telemetry-budget SIZE]
                     [--datasets FILE] [--query-workers N] [--offline] [--drop-folder DIR]
    edge-runtime status [--state-dir DIR] [--json]
    edge-runtime audit-verify PATH [--vkey VKEY] [--json]
    edge-runtime import-bundle FILE [--state-dir DIR] [--json]

The enrollment token comes from exactly one of: ``$EDGEWISE_ENROLLMENT_TOKEN``,
``--token-stdin`` (read from standard input, as ``docker login
--password-stdin`` does), or ``--token TOKEN``. Only the first two keep it out
of process listings: a command line is readable by every local user (``ps``,
``/proc/<pid>/cmdline``), a process's environment only by its own user and root.
The state directory defaults to ``$EDGEWISE_STATE_DIR``, else
``/var/lib/edgewise`` when run as root, else ``~/.local/share/edgewise``.
Telemetry (``run``): a point every ``--telemetry-interval`` seconds
(``$EDGEWISE_TELEMETRY_INTERVAL``, default 5), kept on disk within
``--telemetry-budget`` (``$EDGEWISE_TELEMETRY_BUDGET``, bytes with an optional
K, M or G suffix, default 64M) while the control plane is out of reach; see
:mod:`edge_runtime.telemetry`.
Federated queries (``run``): the node's datasets are declared in
``--datasets`` (default ``<state dir>/datasets.json``; no file there means no
datasets, see :mod:`edge_runtime.data.catalog`), queries run in
``--query-workers`` threads (default 2) under the site's signed data policy,
and every query and decision goes to the node's audit chain
(``<state dir>/audit.sqlite3``); see :mod:`edge_runtime.datasets`.
``audit-verify`` checks an auditor's bundle of the estate's audit trail, or
one entry's inclusion proof, standalone: no state dir, no control plane, no
network (see :mod:`edge_runtime.cli.audit_verify`).
Exit status: 0 on success, 1 when the request was refused or failed, 2 for
bad usage. The commands parse and print; ``run`` builds the node with
:mod:`edge_runtime.node`.
Every command first checks that an onnxruntime variant is installed (the
commands' modules import the model server, which imports onnxruntime) and
stops with the edge runtime's extras to choose from when none is; ``run`` and
``serve`` also refuse two variants installed over each other (see
:mod:`edge_runtime.onnxruntime_variants`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from edge_runtime.cli.common import CliError
from edge_runtime.onnxruntime_variants import OnnxRuntimeError, require_onnxruntime
from edge_runtime.state import default_state_dir


def main(argv: Sequence[str] | None = None) -> int:
    try:
        require_onnxruntime()
    except OnnxRuntimeError as exc:
        print(f"edge-runtime: {exc}", file=sys.stderr)
        return 1
    # Only now: the commands' modules import onnxruntime (through the model server) as they load.
    from edge_runtime.cli.options import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "state_dir", "unset") is None:
        args.state_dir = default_state_dir()
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"edge-runtime {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return code

"""The ``edge-runtime`` command line: subcommands, options, their defaults from the environment, and their checks."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path

from edge_runtime import __version__
from edge_runtime.cli.audit_verify import add_audit_verify
from edge_runtime.cli.bundles import cmd_export_bundle, cmd_import_bundle
from edge_runtime.cli.enroll import TOKEN_ENV, cmd_enroll
from edge_runtime.cli.run import cmd_run, cmd_serve
from edge_runtime.cli.status import cmd_status

SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)i?b?\s*$", re.IGNORECASE)
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def parse_bytes(value: str) -> int:
    """Bytes from "65536", "512K", "64M" or "1G" (powers of 1024)."""
    match = SIZE_RE.match(value)
    if not match:
        raise argparse.ArgumentTypeError(f"a size is a number of bytes with an optional K, M or G, not {value!r}")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


def parse_part_size(value: str) -> int:
    size = parse_bytes(value)
    if size < 1024 * 1024:
        raise argparse.ArgumentTypeError(f"a part holds at least 1M, not {value!r}")
    return size


def parse_size(value: str) -> int:
    """A telemetry budget: bytes as :func:`parse_bytes` reads them, and at least the smallest budget."""
    size = parse_bytes(value)
    from edge_runtime.telemetry import MIN_BUDGET_BYTES

    if size < MIN_BUDGET_BYTES:
        raise argparse.ArgumentTypeError(f"the telemetry budget must be at least {MIN_BUDGET_BYTES // 1024}K, "
                                         f"not {value!r}")
    return size


def parse_interval(value: str) -> float:
    from edge_runtime.telemetry import MIN_INTERVAL_S

    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an interval is a number of seconds, not {value!r}") from None
    if not MIN_INTERVAL_S <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"the telemetry interval must be between {MIN_INTERVAL_S} and 3600 "
                                         f"seconds, not {value!r}")
    return seconds


def whole_number(what: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``; the error names ``what`` and the value given."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} is a whole number, not {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{what} must be between {low} and {high}, not {value!r}")
        return number

    return parse


parse_workers = whole_number("query workers", 1, 64)
# 0: chosen per model (see edge_runtime.serving.loader.auto_instances).
parse_instances = whole_number("model instances", 0, 64)
# 0: chosen for the node (see edge_runtime.serving.workers.auto_processes).
parse_processes = whole_number("serving processes", 0, 64)
parse_max_connections = whole_number("the connection limit", 1, 1_000_000)


def state_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None,
                   help="the node's state directory (default: $EDGEWISE_STATE_DIR, /var/lib/edgewise as root, "
                        "else ~/.local/share/edgewise)")


def log_level_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=os.environ.get("EDGEWISE_LOG_LEVEL", "INFO").upper(),
                   choices=LOG_LEVELS, type=str.upper)


def instances_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", type=parse_instances, default=os.environ.get("EDGEWISE_MODEL_INSTANCES", "0"),
                   help="batches of one model run side by side, each on its share of the CPUs (default 0: "
                        "2 on CPU with 2 or more cores, the most rows a second; 1: the lowest latency "
                        "for a request that arrives alone)")
    p.add_argument("--serving-processes", type=parse_processes,
                   default=os.environ.get("EDGEWISE_SERVING_PROCESSES", "0"),
                   help="processes serving the models on the one port, each holding every model (default 0: "
                        "one per CPU up to 4 on a CPU-only Linux node with 2 GiB or more, else 1; 1: the "
                        "least memory)")
    # No default here: the model server's own (edge_runtime.serving.http) applies, without importing it.
    p.add_argument("--max-connections", type=parse_max_connections,
                   default=os.environ.get("EDGEWISE_SERVE_MAX_CONNECTIONS") or None,
                   help="connections each serving process of the model server holds open at most; one more "
                        "gets 503 (default 1024; keep it under the open-file limit)")


def model_control_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-control", choices=["none", "explicit"],
                   default=os.environ.get("EDGEWISE_MODEL_CONTROL", "none"),
                   help="explicit: clients may unload, and load again, the models this node was asked to serve "
                        "through the repository API (POST /v2/repository/models/NAME/load|unload; never another "
                        "file); none (the default): those calls are refused with 503")


def parse_providers(value: str) -> list[str]:
    """A comma separated provider list, each name one onnxruntime knows (a misspelling is named)."""
    from edge_runtime.protocol.providers import ProviderNameError, check_names

    try:
        return check_names([x.strip() for x in value.split(",") if x.strip()], "--providers")
    except ProviderNameError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def providers_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--providers", type=parse_providers, default=os.environ.get("EDGEWISE_PROVIDERS", ""),
                   help="the execution providers this node uses, in order of preference, and no other "
                        "(default: every one this machine has, the best first, CPU last; "
                        "CPUExecutionProvider alone forces CPU)")


def add_enroll(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    enroll = sub.add_parser("enroll", help="enroll this machine as a node of a site")
    enroll.add_argument("--url", required=True, help="the control plane's URL, e.g. https://edgewise.example.org")
    # Not an argparse exclusive group: one check (enrollment_token) names every source, also the variable.
    enroll.add_argument("--token-stdin", action="store_true",
                        help=f"read the site's enrollment token from standard input (or set ${TOKEN_ENV})")
    enroll.add_argument("--token", help="the site's enrollment token; visible to every local user in process "
                                        f"listings, so prefer --token-stdin or ${TOKEN_ENV}")
    enroll.add_argument("--fingerprint", help="sha256 fingerprint (hex) the control plane's signing key must have")
    enroll.add_argument("--name", help="the node's name at its site (default: this host's name)")
    enroll.add_argument("--role", choices=["device", "gateway", "server"], default="device")
    enroll.add_argument("--force", action="store_true", help="replace an existing identity in the state dir")
    state_dir_option(enroll)
    enroll.set_defaults(func=cmd_enroll)


def add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the agent until SIGTERM or SIGINT")
    log_level_option(run)
    run.add_argument("--serve-host", default=os.environ.get("EDGEWISE_SERVE_HOST", "127.0.0.1"),
                     help="address of the local inference API (default 127.0.0.1; 0.0.0.0 for the site's LAN)")
    run.add_argument("--serve-port", type=int, default=int(os.environ.get("EDGEWISE_SERVE_PORT", "8080")),
                     help="port of the local inference API (default 8080; -1 serves no models)")
    run.add_argument("--telemetry-interval", type=parse_interval,
                     default=os.environ.get("EDGEWISE_TELEMETRY_INTERVAL", "5"),
                     help="seconds between telemetry points (default 5)")
    run.add_argument("--telemetry-budget", type=parse_size, default=os.environ.get("EDGEWISE_TELEMETRY_BUDGET", "64M"),
                     help="disk space for telemetry waiting for the control plane, e.g. 512K, 64M (default 64M); "
                          "past it the oldest points give way to a gap record")
    run.add_argument("--datasets", type=Path, default=os.environ.get("EDGEWISE_DATASETS") or None,
                     help="the node's datasets file (default: <state dir>/datasets.json; none there: no datasets)")
    run.add_argument("--query-workers", type=parse_workers, default=os.environ.get("EDGEWISE_QUERY_WORKERS", "2"),
                     help="federated queries run at once on this node (default 2)")
    run.add_argument("--offline", action="store_true", default=os.environ.get("EDGEWISE_AIR_GAPPED") == "1",
                     help="never dial the control plane: desired states, queries and receipts come by bundle only "
                          "(an air-gapped site; $EDGEWISE_AIR_GAPPED=1)")
    run.add_argument("--drop-folder", type=Path, default=os.environ.get("EDGEWISE_DROP_FOLDER") or None,
                     help="import every bundle copied into this folder (moved to imported/ or refused/ after)")
    providers_option(run)
    instances_option(run)
    model_control_option(run)
    state_dir_option(run)
    run.set_defaults(func=cmd_run)


def add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="serve every .onnx file in a folder, with no control plane")
    serve.add_argument("--model-dir", type=Path, required=True, help="folder of .onnx files (name = file stem)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--max-batch-size", type=int, default=8)
    serve.add_argument("--max-queue-delay-ms", type=float, default=0.0)
    log_level_option(serve)
    providers_option(serve)
    instances_option(serve)
    model_control_option(serve)
    serve.set_defaults(func=cmd_serve)


def add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="show this node's state (works offline)")
    status.add_argument("--json", action="store_true", help="print JSON")
    state_dir_option(status)
    status.set_defaults(func=cmd_status)


def add_import_bundle(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("import-bundle", help="verify a bundle from the control plane and queue it for the agent")
    p.add_argument("file", type=Path, metavar="FILE", help="the bundle (FILE, or its first part FILE.001)")
    p.add_argument("--json", action="store_true", help="print what was imported as JSON")
    state_dir_option(p)
    p.set_defaults(func=cmd_import_bundle)


def add_export_bundle(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export-bundle", help="write this node's bundle out for the control plane (signed by the node)")
    p.add_argument("file", type=Path, metavar="FILE", help="where to write it (never overwritten)")
    p.add_argument("--part-size", type=parse_part_size, default=None, metavar="SIZE",
                   help="split into parts of SIZE (e.g. 4g) for removable media: FILE.001, FILE.002, ...")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    state_dir_option(p)
    p.set_defaults(func=cmd_export_bundle)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-runtime", description="The Edgewise edge runtime.")
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_enroll, add_run, add_serve, add_status, add_audit_verify, add_import_bundle,
                add_export_bundle):
        add(sub)
    return parser

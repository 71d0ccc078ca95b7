"""``edge-runtime``: enroll this machine as a node, run the agent, show its status.

::

    edge-runtime enroll --url URL [--token-stdin | --token TOKEN] [--fingerprint HEX]
                        [--name NAME] [--role device|gateway|server] [--state-dir DIR] [--force]
    edge-runtime run [--state-dir DIR] [--log-level LEVEL]
                     [--telemetry-interval SECONDS] [--telemetry-budget SIZE]
                     [--datasets FILE] [--query-workers N]
    edge-runtime status [--state-dir DIR] [--json]

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
Exit status: 0 on success, 1 when the request was refused or failed, 2 for
bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import datetime as dt
import json
import logging
import os
import re
import secrets
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar
from urllib.parse import urlsplit

import httpx
from cryptography.exceptions import InvalidSignature
from pydantic import ValidationError

from edge_runtime import __version__, signing
from edge_runtime.agent import Agent
from edge_runtime.hardware import detect_hardware
from edge_runtime.logs import OneLineFormatter
from edge_runtime.protocol import API_PREFIX, EnrollRequest, EnrollResponse
from edge_runtime.state import Identity, StateDir, StateError, default_state_dir

if TYPE_CHECKING:
    from edge_runtime.datasets import DatasetService

ENROLL_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")


class CliError(Exception):
    """Ends the command with a message on stderr and exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The libraries' own chatter (every request, every frame) is not an event of the node's.
    for name in ("httpx", "httpcore", "websockets"):
        logging.getLogger(name).setLevel(logging.WARNING)


def normalize_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"--url must be an http:// or https:// URL with a host, not {value!r}", 2)
    if parts.query or parts.fragment:
        raise CliError(f"--url must not carry a query or fragment: {value!r}", 2)
    return value.strip().rstrip("/")


def normalize_fingerprint(value: str) -> str:
    cleaned = value.strip().lower().replace(":", "")
    if not FINGERPRINT_RE.match(cleaned):
        raise CliError(f"--fingerprint must be the 64 hex digits of a sha256 fingerprint, not {value!r}", 2)
    return cleaned


def default_node_name() -> str:
    # Host names may hold characters a node name may not (the protocol allows [A-Za-z0-9._-]).
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")[:100]
    return name or "node"


# enroll -------------------------------------------------------------------------


TOKEN_ENV = "EDGEWISE_ENROLLMENT_TOKEN"
TOKEN_SOURCES = f"${TOKEN_ENV}, --token-stdin or --token"


def enrollment_token(args: argparse.Namespace, environ: Mapping[str, str], stdin: TextIO) -> tuple[str, str]:
    """The token and the name of where it came from; exactly one source may be given."""
    given = [name for name, present in ((f"${TOKEN_ENV}", TOKEN_ENV in environ),
                                        ("--token-stdin", args.token_stdin),
                                        ("--token", args.token is not None)) if present]
    if not given:
        raise CliError(f"no enrollment token: give it in {TOKEN_SOURCES}", 2)
    if len(given) > 1:
        raise CliError(f"the enrollment token was given more than once ({' and '.join(given)}); "
                       f"use exactly one of {TOKEN_SOURCES}", 2)
    source = given[0]
    if source == "--token-stdin":
        # Like `docker login --password-stdin`: the whole input, without the line end a pipe adds.
        value = stdin.read().strip()
        if not value:
            raise CliError("--token-stdin: standard input held no enrollment token", 2)
    elif source == "--token":
        value = args.token.strip()
        if not value:
            raise CliError("--token: the enrollment token is empty", 2)
    else:
        value = environ[TOKEN_ENV].strip()
        if not value:
            raise CliError(f"${TOKEN_ENV} is set but empty; set it to the enrollment token or unset it", 2)
    return value, source


def cmd_enroll(args: argparse.Namespace) -> int:
    url = normalize_url(args.url)
    token, token_source = enrollment_token(args, os.environ, sys.stdin)
    expected = normalize_fingerprint(args.fingerprint) if args.fingerprint else None
    state = StateDir(args.state_dir)
    if state.has_identity() and not args.force:
        try:
            current = state.load_identity()
            who = f"node {current.node_id} ({current.name}) at site {current.site}"
        except StateError:
            who = "a node (its identity file is unreadable)"
        raise CliError(f"{state.path} already holds the identity of {who}; pass --force to enroll again")
    try:
        request = EnrollRequest(
            token=token, name=args.name or default_node_name(), role=args.role,
            runtime_version=__version__, hardware=detect_hardware(),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        option = {"token": token_source, "name": "--name", "role": "--role"}.get(str(first["loc"][0]), "request")
        raise CliError(f"invalid {option}: {first['msg']}", 2) from exc

    if expected is not None:
        # Before the one-time token leaves this machine: the control plane at
        # this URL must prove it holds the key the installer was issued with.
        check_signing_key(url, expected)

    endpoint = f"{url}{API_PREFIX}/enroll"
    try:
        response = httpx.post(endpoint, content=request.model_dump_json(),
                              headers={"Content-Type": "application/json"}, timeout=ENROLL_TIMEOUT)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the control plane at {url}: {exc or type(exc).__name__}") from exc
    if response.status_code != 201:
        raise CliError(f"enrollment refused (HTTP {response.status_code}): {_error_message(response)}")
    try:
        answer = EnrollResponse.model_validate_json(response.content)
    except ValidationError as exc:
        raise CliError(f"the control plane's answer is not a valid enrollment: {exc.errors()[0]['msg']}") from exc

    # The key must be the one the answer names, and (when the installer says
    # which key to expect) the one the installer was issued with: a different
    # key means a different control plane, or someone in between.
    try:
        raw_key = base64.b64decode(answer.signing_public_key, validate=True)
        signing.public_key_from_b64(answer.signing_public_key)
    except (binascii.Error, signing.SignatureError) as exc:
        raise CliError(f"the control plane sent an unusable signing key: {exc}; nothing was written") from exc
    actual = signing.fingerprint(raw_key)
    if actual != answer.signing_key_fingerprint.lower():
        raise CliError(f"the control plane's signing key has fingerprint {actual}, not the "
                       f"{answer.signing_key_fingerprint} it claims; nothing was written")
    if expected is not None and actual != expected:
        raise CliError(f"the control plane's signing key fingerprint {actual} does not match the expected "
                       f"{expected}; refusing to trust it, nothing was written")

    identity = Identity(
        node_id=answer.node_id, site=answer.site, name=request.name, role=request.role,
        credential=answer.credential, url=url, signing_public_key=answer.signing_public_key,
        signing_key_fingerprint=actual, sync_interval_s=answer.sync_interval_s,
        enrolled_at=dt.datetime.now(dt.UTC),
    )
    if args.force:
        state.clear()
    state.save_identity(identity)
    print(f"enrolled node {identity.node_id} ({identity.name}, {identity.role}) at site {identity.site}")
    print(f"pinned signing key fingerprint {actual}")
    print(f"state dir {state.path}")
    return 0


def check_signing_key(url: str, expected: str) -> None:
    """Raise CliError unless the control plane proves it holds the key with fingerprint ``expected``."""
    challenge = secrets.token_hex(32)
    try:
        response = httpx.get(f"{url}{API_PREFIX}/signing-key", params={"challenge": challenge},
                             timeout=ENROLL_TIMEOUT)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the control plane at {url}: {exc or type(exc).__name__}") from exc
    if response.status_code != 200:
        raise CliError(f"the control plane did not show its signing key (HTTP {response.status_code}): "
                       f"{_error_message(response)}; the token was not used")
    try:
        body = response.json()
        raw = base64.b64decode(body["public_key"], validate=True)
        proof = base64.b64decode(body["signature"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise CliError(f"the control plane's signing key answer is malformed ({exc}); the token was not used") from exc
    actual = signing.fingerprint(raw)
    if actual != expected:
        raise CliError(f"the control plane's signing key fingerprint {actual} does not match the expected "
                       f"{expected}; refusing to trust it, the token was not used and nothing was written")
    try:
        public = signing.public_key_from_b64(body["public_key"])
        public.verify(proof, signing.key_proof_message(challenge))
    except (signing.SignatureError, InvalidSignature) as exc:
        raise CliError("the control plane could not prove it holds the signing key it shows; "
                       "the token was not used and nothing was written") from exc


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        field = body.get("field")
        return f"{body['error']}" + (f" (field {field})" if isinstance(field, str) and field else "")
    return response.reason_phrase or "no error message"


# run ----------------------------------------------------------------------------


T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (the model server's HTTP is faster on it), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    state = StateDir(args.state_dir)
    try:
        with state.agent_lock():
            run_loop(_run_node(state, args))
    except StateError as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot serve models on {args.serve_host}:{args.serve_port}: {exc}") from exc
    return 0


async def _run_node(state: StateDir, args: argparse.Namespace) -> None:
    """The agent and, beside it in the same loop, the model server it feeds.

    The server starts first and answers from whatever the last verified
    desired state loads, so local applications keep their inference while the
    control plane is out of reach.
    """
    from edge_runtime.models import ModelService, ModelStore
    from edge_runtime.serving.metrics import read_series
    from edge_runtime.serving.registry import ModelRegistry
    from edge_runtime.serving.server import run_server
    from edge_runtime.telemetry import QUEUE_FILE, Telemetry, TelemetryQueue

    identity = state.load_identity()
    options: dict[str, Any] = {"provider_priority": args.providers} if args.providers else {}
    from edge_runtime.serving.workers import cpu_share, resolve_processes

    try:
        processes = resolve_processes(args.serving_processes) if args.serve_port >= 0 else 1
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    registry = ModelRegistry(instances=args.instances, cpus=cpu_share(processes), **options)
    store = ModelStore(registry=registry, state_dir=state.path, base_url=identity.url,
                       node_id=identity.node_id, credential=identity.credential,
                       public_key=identity.signing_public_key)
    # Before the server starts: a datasets file that cannot be read stops the node with its reason.
    queries = _query_service(state, identity, args, registry)
    handle = None
    if args.serve_port >= 0:
        limits = {"max_connections": args.max_connections} if args.max_connections else {}
        handle = await run_server(registry, args.serve_host, args.serve_port, processes=processes, **limits)
        logging.getLogger("edge_runtime").info("model server listening on %s (%d serving process%s)", handle.url,
                                               processes, "" if processes == 1 else "es")
    queue = TelemetryQueue(state.path / QUEUE_FILE, budget_bytes=args.telemetry_budget)
    telemetry = Telemetry(queue, interval_s=args.telemetry_interval,
                          read_models=lambda: read_series(registry.metrics), disk_path=state.path)
    agent = Agent(state, reconcilers=[ModelService(store), queries], telemetry=telemetry)
    agent.status.model_server_url = handle.url if handle is not None else ""
    try:
        await agent.run()
    finally:
        await queries.aclose()
        queue.close()
        if handle is not None:
            await handle.stop()
        await store.aclose()
        await registry.close()


def _query_service(state: StateDir, identity: Identity, args: argparse.Namespace, registry: Any) -> DatasetService:
    """The node's federated query service: its datasets, its audit chain, its model server as scorer."""
    from edge_runtime.audit import AuditError, NodeAudit
    from edge_runtime.data.catalog import DATASETS_FILE, Catalog, CatalogError
    from edge_runtime.data.node import registry_scorer
    from edge_runtime.datasets import DatasetService

    try:
        if args.datasets is None:
            catalog = Catalog.from_state_dir(state.path)
            where = state.path / DATASETS_FILE
        else:
            catalog = Catalog.from_file(args.datasets)
            where = args.datasets
        audit = NodeAudit.in_state_dir(state.path)
    except (CatalogError, AuditError) as exc:
        raise CliError(str(exc)) from exc
    logging.getLogger("edge_runtime").info("datasets: %s (from %s)", ", ".join(catalog.names()) or "none", where)
    return DatasetService(state_dir=state.path, catalog=catalog, audit=audit, base_url=identity.url,
                        node_id=identity.node_id, credential=identity.credential, site=identity.site,
                        scorer=registry_scorer(registry), workers=args.query_workers)


def cmd_serve(args: argparse.Namespace) -> int:
    from edge_runtime.serving.standalone import serve_main

    setup_logging(args.log_level)
    kwargs: dict[str, Any] = {"max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
                              "instances": args.instances, "processes": args.serving_processes}
    if args.max_connections:
        kwargs["max_connections"] = args.max_connections
    if args.providers:
        kwargs["provider_priority"] = args.providers
    return serve_main(args.model_dir, args.host, args.port, **kwargs)


# status -------------------------------------------------------------------------


def status_report(state: StateDir) -> dict[str, Any]:
    """What the node knows about itself, from its state dir only (works offline)."""
    from edge_runtime.telemetry import read_queue_stats

    identity = state.load_identity()
    queue = read_queue_stats(state.path)
    telemetry: dict[str, Any] = {"pending_points": 0, "pending_gaps": 0, "pending_bytes": 0, "next_seq": 1,
                                 "acked_seq": 0, "lost_points": 0, "gaps": []}
    if queue is not None:
        telemetry = {"pending_points": queue.pending_points, "pending_gaps": queue.pending_gaps,
                     "pending_bytes": queue.pending_bytes, "next_seq": queue.next_seq, "acked_seq": queue.acked_seq,
                     "lost_points": queue.lost_points,
                     "gaps": [{"first_seq": a, "last_seq": b, "count": c} for a, b, c in queue.gaps]}
    status = state.load_status()
    desired: dict[str, Any]
    try:
        loaded = state.load_desired(identity)
    except StateError as exc:
        desired = {"verified": False, "error": str(exc)}
    else:
        if loaded is None:
            desired = {"verified": False, "error": "none received yet"}
        else:
            _, state_ = loaded
            desired = {"verified": True, "generation": state_.generation, "issued_at": state_.issued_at.isoformat(),
                       "labels": state_.labels, "sync_interval_s": state_.sync_interval_s}
    return {
        "node_id": identity.node_id,
        "name": identity.name,
        "role": identity.role,
        "site": identity.site,
        "url": identity.url,
        "signing_key_fingerprint": identity.signing_key_fingerprint,
        "applied_generation": status.applied_generation,
        "epoch": status.epoch,
        "epoch_started_at": status.epoch_started_at.isoformat() if status.epoch_started_at else None,
        "refusing": status.refusing.model_dump(mode="json") if status.refusing else None,
        "last_sync_at": status.last_sync_at.isoformat() if status.last_sync_at else None,
        "last_attempt_at": status.last_attempt_at.isoformat() if status.last_attempt_at else None,
        "consecutive_failures": status.consecutive_failures,
        "pending_refusals": [r.model_dump(mode="json") for r in status.pending_refusals],
        "last_error": status.last_error,
        "last_error_at": status.last_error_at.isoformat() if status.last_error_at else None,
        "updated_at": status.updated_at.isoformat() if status.updated_at else None,
        "desired_state": desired,
        "model_server_url": status.model_server_url,
        "telemetry": telemetry,
        "state_dir": str(state.path),
    }


def cmd_status(args: argparse.Namespace) -> int:
    try:
        report = status_report(StateDir(args.state_dir))
    except StateError as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    desired = report["desired_state"]
    lines = [
        ("node", f"{report['node_id']} ({report['name']}, {report['role']})"),
        ("site", report["site"]),
        ("control plane", report["url"]),
        ("key fingerprint", report["signing_key_fingerprint"]),
        ("applied generation", f"{report['applied_generation']} in epoch {report['epoch'] or '(none)'}"),
        ("refusing", f"generation {report['refusing']['generation']}: {report['refusing']['reason']}"
         if report["refusing"] else "nothing"),
        ("desired state on disk", f"generation {desired['generation']}, verified" if desired["verified"]
         else f"REFUSED: {desired['error']}"),
        ("last sync", report["last_sync_at"] or "never"),
        ("failed syncs", str(report["consecutive_failures"])),
        ("pending refusals", "; ".join(f"generation {r['generation']}: {r['reason']}"
                                        for r in report["pending_refusals"]) or "none"),
        ("last error", report["last_error"] or "none"),
        ("telemetry waiting", f"{report['telemetry']['pending_points']} point(s), "
                              f"{report['telemetry']['pending_gaps']} gap record(s); "
                              f"{report['telemetry']['lost_points']} point(s) lost to the disk budget"),
        ("state dir", report["state_dir"]),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


# entry point --------------------------------------------------------------------


SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)i?b?\s*$", re.IGNORECASE)


def parse_size(value: str) -> int:
    """Bytes from "65536", "512K", "64M" or "1G" (powers of 1024)."""
    match = SIZE_RE.match(value)
    if not match:
        raise argparse.ArgumentTypeError(f"a size is a number of bytes with an optional K, M or G, not {value!r}")
    number, unit = int(match.group(1)), match.group(2).lower()
    size = number * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-runtime", description="The Edgewise edge runtime.")
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def state_dir_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", type=Path, default=None,
                       help="the node's state directory (default: $EDGEWISE_STATE_DIR, /var/lib/edgewise as root, "
                            "else ~/.local/share/edgewise)")

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

    def providers_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--providers", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                       default=[x.strip() for x in os.environ.get("EDGEWISE_PROVIDERS", "").split(",") if x.strip()],
                       help="execution providers in order of preference (default: the best this machine has, "
                            "CPU last)")

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

    run = sub.add_parser("run", help="run the agent until SIGTERM or SIGINT")
    run.add_argument("--log-level", default=os.environ.get("EDGEWISE_LOG_LEVEL", "INFO").upper(),
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
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
    providers_option(run)
    instances_option(run)
    state_dir_option(run)
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="serve every .onnx file in a folder, with no control plane")
    serve.add_argument("--model-dir", type=Path, required=True, help="folder of .onnx files (name = file stem)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--max-batch-size", type=int, default=8)
    serve.add_argument("--max-queue-delay-ms", type=float, default=0.0)
    serve.add_argument("--log-level", default=os.environ.get("EDGEWISE_LOG_LEVEL", "INFO").upper(),
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    providers_option(serve)
    instances_option(serve)
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", help="show this node's state (works offline)")
    status.add_argument("--json", action="store_true", help="print JSON")
    state_dir_option(status)
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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

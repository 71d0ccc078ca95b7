"""``edge-runtime run`` and ``edge-runtime serve``: the options turned into a node (or a bare model server)."""

from __future__ import annotations

import argparse
from typing import Any

from edge_runtime.cli.common import CliError, setup_logging
from edge_runtime.node import NodeConfig, NodeError, run_node
from edge_runtime.onnxruntime_variants import OnnxRuntimeError, check_onnxruntime
from edge_runtime.state import StateDir, StateError


def node_config(args: argparse.Namespace) -> NodeConfig:
    return NodeConfig(
        serve_host=args.serve_host, serve_port=args.serve_port, serving_processes=args.serving_processes,
        instances=args.instances, max_connections=args.max_connections, providers=tuple(args.providers),
        telemetry_interval_s=args.telemetry_interval, telemetry_budget_bytes=args.telemetry_budget,
        datasets=args.datasets, query_workers=args.query_workers, offline=args.offline, drop_folder=args.drop_folder,
        model_control=args.model_control,
    )


def checked_onnxruntime() -> str:
    """The onnxruntime distribution the models will run on; a CliError if there is none, or several."""
    try:
        return check_onnxruntime()
    except OnnxRuntimeError as exc:
        raise CliError(str(exc)) from exc


def cmd_run(args: argparse.Namespace) -> int:
    checked_onnxruntime()
    setup_logging(args.log_level)
    try:
        run_node(StateDir(args.state_dir), node_config(args))
    except (StateError, NodeError) as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot serve models on {args.serve_host}:{args.serve_port}: {exc}") from exc
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from edge_runtime.serving.standalone import serve_main

    checked_onnxruntime()
    setup_logging(args.log_level)
    kwargs: dict[str, Any] = {"max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
                              "instances": args.instances, "processes": args.serving_processes,
                              "model_control": args.model_control}
    if args.max_connections:
        kwargs["max_connections"] = args.max_connections
    if args.providers:
        kwargs["provider_priority"] = args.providers
    return serve_main(args.model_dir, args.host, args.port, **kwargs)

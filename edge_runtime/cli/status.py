"""``edge-runtime status``: what the node knows about itself, read from its state directory only (works offline)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edge_runtime.cli.common import CliError
from edge_runtime.state import Identity, StateDir, StateError


def status_report(state: StateDir) -> dict[str, Any]:
    """What the node knows about itself, from its state dir only (works offline)."""
    identity = state.load_identity()
    status = state.load_status()
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
        "desired_state": _desired_report(state, identity),
        "model_server_url": status.model_server_url,
        "telemetry": _telemetry_report(state),
        "bundles": _bundles_report(state),
        "state_dir": str(state.path),
    }


def _bundles_report(state: StateDir) -> dict[str, Any]:
    from edge_runtime.airgap.inbound import Bundles

    bundles = Bundles(state)
    try:
        current = bundles.load()
    except StateError as exc:
        return {"error": str(exc)}
    return {**current.model_dump(mode="json"), "inbox": [int(p.stem) for p in bundles.pending()]}


def _telemetry_report(state: StateDir) -> dict[str, Any]:
    from edge_runtime.telemetry import read_queue_stats

    queue = read_queue_stats(state.path)
    if queue is None:
        return {"pending_points": 0, "pending_gaps": 0, "pending_bytes": 0, "next_seq": 1,
                "acked_seq": 0, "lost_points": 0, "gaps": []}
    return {"pending_points": queue.pending_points, "pending_gaps": queue.pending_gaps,
            "pending_bytes": queue.pending_bytes, "next_seq": queue.next_seq, "acked_seq": queue.acked_seq,
            "lost_points": queue.lost_points,
            "gaps": [{"first_seq": a, "last_seq": b, "count": c} for a, b, c in queue.gaps]}


def _desired_report(state: StateDir, identity: Identity) -> dict[str, Any]:
    try:
        loaded = state.load_desired(identity)
    except StateError as exc:
        return {"verified": False, "error": str(exc)}
    if loaded is None:
        return {"verified": False, "error": "none received yet"}
    _, desired = loaded
    return {"verified": True, "generation": desired.generation, "issued_at": desired.issued_at.isoformat(),
            "labels": desired.labels, "sync_interval_s": desired.sync_interval_s}


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
        ("bundles", _bundles_line(report["bundles"])),
        ("state dir", report["state_dir"]),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


def _bundles_line(bundles: dict[str, Any]) -> str:
    if "error" in bundles:
        return f"ERROR: {bundles['error']}"
    if not bundles["in_sequence"] and not bundles["out_sequence"] and not bundles["last_refusal"]:
        return "none"
    parts = [f"in {bundles['in_sequence']} (applied {bundles['applied_sequence']})", f"out {bundles['out_sequence']}"]
    if bundles["inbox"]:
        parts.append(f"waiting to apply: {', '.join(map(str, bundles['inbox']))}")
    if bundles["in_warning"]:
        parts.append(f"warning: {bundles['in_warning']}")
    if bundles["last_refusal"]:
        parts.append(f"last refused: {bundles['last_refusal']}")
    return "; ".join(parts)

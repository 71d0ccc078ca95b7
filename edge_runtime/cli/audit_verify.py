"""``edge-runtime audit-verify PATH [--vkey VKEY] [--json]``: check an auditor's bundle of the estate's audit trail,
or one entry's inclusion proof, with nothing but this package (no control plane, no network).

A zip file is read as a bundle (:mod:`edge_runtime.audit_bundle`), anything
else as an inclusion proof (:mod:`edge_runtime.audit_inclusion`). ``--vkey`` is
the control plane's audit log key as the auditor got it from a source they
trust; without it the file's own key is used, and a warning says that this
proves only that the file agrees with itself. Exit status: 0 when everything
verifies, 1 when anything does not (the reason on stderr), 2 when the path is
no file, no bundle and no inclusion proof, or the key given is no key.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

from edge_runtime.audit_bundle import (
    BundleError,
    BundleReport,
    InclusionReport,
    LogReport,
    verify_bundle,
    verify_inclusion_file,
)
from edge_runtime.cli.common import CliError

UNTRUSTED = ("no --vkey given: checked with the key the {what} names itself, which shows only that it agrees "
             "with itself; give --vkey with the control plane's audit log key from a source you trust")


def _time(seconds: int | None) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat() if seconds is not None else "never"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _log_line(log: LogReport) -> str:
    name = "control plane log" if log.log == "control-plane" else f"node {log.log} (site {log.site})"
    if not log.ok:
        return f"{name}: FAILED: {log.error}"
    text = (f"{name}: ok: {_count(log.entries, 'entry', 'entries')}, "
            f"{_count(log.checkpoints, 'checkpoint', 'checkpoints')}, last size {log.last_size} "
            f"cosigned {_time(log.last_cosigned_at)}")
    if log.heads_checked:
        text += f"; agrees with the {_count(log.heads_checked, 'head', 'heads')} of it the control plane's log recorded"
    if log.uncovered:
        text += f"; {log.uncovered} of its entries not yet covered by a checkpoint"
    return text


def _bundle_failure(report: BundleReport) -> str:
    if report.errors:
        return report.errors[0]
    failed = [log for log in report.logs if not log.ok]
    first = failed[0]
    name = "the control plane log" if first.log == "control-plane" else f"the log of node {first.log}"
    more = f" (and {len(failed) - 1} more logs)" if len(failed) > 1 else ""
    return f"{name}: {first.error}{more}"


def _show_bundle(report: BundleReport, as_json: bool) -> None:
    if report.key_from_bundle:
        print(f"warning: {UNTRUSTED.format(what='bundle')}", file=sys.stderr)
    if as_json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
        return
    print(f"bundle {report.path}, created {report.created_at or 'unknown'}")
    if report.control_plane_vkey:
        print(f"control plane {report.control_plane_origin}, key {report.control_plane_vkey}")
    for error in report.errors:
        print(f"bundle: FAILED: {error}")
    for log in report.logs:
        print(_log_line(log))
    if report.ok:
        print(f"verified: {len(report.logs)} logs, {sum(log.entries for log in report.logs)} entries")


def _show_inclusion(report: InclusionReport, as_json: bool) -> None:
    if report.key_from_file:
        print(f"warning: {UNTRUSTED.format(what='inclusion proof')}", file=sys.stderr)
    if as_json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2, sort_keys=True))
        return
    what = f"leaf {report.index} ({report.action or 'an entry'}) of {report.origin or 'the log'}"
    if report.ok:
        cosigned = f", cosigned {_time(report.cosigned_at)}" if report.cosigned_at is not None else ""
        print(f"verified: {what} is in the log of size {report.size} that its checkpoint signs{cosigned}")
    else:
        print(f"inclusion proof of {what}: FAILED: {report.error}")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    path: Path = args.path
    if not path.exists():
        raise CliError(f"{path} does not exist", 2)
    if not path.is_file():
        raise CliError(f"{path} is not a file", 2)
    try:
        if zipfile.is_zipfile(path):
            bundle = verify_bundle(path, trusted_vkey=args.vkey)
            _show_bundle(bundle, args.json)
            if not bundle.ok:
                raise CliError(f"the bundle does not verify: {_bundle_failure(bundle)}")
        else:
            inclusion = verify_inclusion_file(path, trusted_vkey=args.vkey)
            _show_inclusion(inclusion, args.json)
            if not inclusion.ok:
                raise CliError(f"the inclusion proof does not verify: {inclusion.error}")
    except BundleError as exc:
        raise CliError(str(exc), 2) from None
    return 0


def add_audit_verify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = sub.add_parser("audit-verify", help="check an audit bundle or an inclusion proof, standalone")
    command.add_argument("path", type=Path, metavar="PATH", help="an audit bundle (zip) or an inclusion proof (JSON)")
    command.add_argument("--vkey", help="the control plane's audit log key (C2SP vkey) as you got it from a source "
                                        "you trust (default: the file's own, with a warning)")
    command.add_argument("--json", action="store_true", help="print the report as JSON")
    command.set_defaults(func=cmd_audit_verify)

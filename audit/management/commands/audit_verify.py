from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit import anchors
from audit.log_key import AuditKeyError, log_key
from audit.models import AuditCheckpoint
from audit.node_verify import NodeLogsReport, node_logs_verify
from audit.services import audit_verify
from edge_runtime.notes import NoteError


class Command(BaseCommand):
    help = ("Recompute the audit log from its records and compare it with every signed checkpoint: the database's, "
            "the configured anchor file's and each --anchor file's; name the first record that differs.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--anchor", action="append", default=[], metavar="FILE",
                            help="an anchor file kept elsewhere (audit_checkpoint_export); any number of times")
        parser.add_argument("--vkey", action="append", default=None, metavar="VKEY",
                            help="the log's verifier key (default: the public half of the configured log key)")
        parser.add_argument("--no-anchor-dir", action="store_true",
                            help="skip the anchor file of EDGEWISE_AUDIT_ANCHOR_DIR")

    def handle(self, *args: Any, **options: Any) -> None:
        files = [Path(p) for p in options["anchor"]]
        for path in files:
            if not path.is_file():
                raise CommandError(f"--anchor {path}: no such file")
        configured = anchors.anchor_path()
        if not options["no_anchor_dir"] and configured.exists() and configured not in files:
            files.append(configured)
        try:
            report = audit_verify(anchor_files=files, vkeys=options["vkey"])
            if not AuditCheckpoint.objects.exists():
                nodes = NodeLogsReport()
            elif options["vkey"]:  # the pinned keys check the nodes' cosigned checkpoints too
                nodes = node_logs_verify(vkeys=options["vkey"])
            else:
                nodes = node_logs_verify(log_key())
        except (AuditKeyError, NoteError) as exc:
            raise CommandError(str(exc)) from None
        if not report.ok or nodes.breaks:
            lines = [f"{p.kind}: {p.message}" for p in report.problems]
            more = sum(report.counts.values()) - len(report.problems)
            if more:
                lines.append(f"... and {more} more")
            lines.extend(f"node log: {brk}" for brk in nodes.breaks)
            raise CommandError(f"audit log verification failed ({report.checked} records checked, "
                               f"{report.checkpoints} checkpoints compared, {nodes.entries} node log entries of "
                               f"{nodes.logs} nodes):\n" + "\n".join(lines))
        self.stdout.write(self.style.SUCCESS(
            f"audit log intact: {report.checked} records verified, {report.checkpoints} signed checkpoints compared "
            f"({len(files)} anchor files), {report.pending} waiting for a checkpoint; {nodes.entries} entries of "
            f"{nodes.logs} node logs verified against their cosigned checkpoints"))

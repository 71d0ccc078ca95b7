from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.export import ExportError, audit_export
from audit.log_key import AuditKeyError
from audit.services import Actor


class Command(BaseCommand):
    help = ("Write the estate's audit trail (the control plane's log and every node's, their checkpoints, "
            "proofs and keys) as one bundle, which `edge-runtime audit-verify FILE --vkey VKEY` checks anywhere.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", metavar="FILE", help="the bundle to write (a zip file; must not exist)")
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["file"])
        if path.exists():
            raise CommandError(f"{path} exists: choose another name (an export never overwrites a file)")
        if not path.parent.is_dir():
            raise CommandError(f"{path.parent} is not a directory")
        try:
            summary = audit_export(path, actor=Actor.system("audit_export"))
        except (ExportError, AuditKeyError) as exc:
            raise CommandError(f"the audit trail was not exported: {exc}") from None
        except OSError as exc:
            raise CommandError(f"{path} cannot be written: {exc.strerror or exc}") from None
        if options["json"]:
            self.stdout.write(json.dumps(summary.to_json(), indent=2))
            return
        for line in summary.lines():
            self.stdout.write(line)
        self.stdout.write(self.style.SUCCESS(f"wrote {path}; check it with: edge-runtime audit-verify {path} "
                                             f"--vkey '{summary.vkey}'"))

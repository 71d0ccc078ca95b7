from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit import anchors
from audit.log_key import AuditKeyError, log_key
from audit.models import AuditCheckpoint


class Command(BaseCommand):
    help = ("Write the audit log's signed checkpoints as an anchor file to keep elsewhere; "
            "audit_verify --anchor FILE later detects any rewrite of the log made after it.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", metavar="FILE", help="the anchor file to write (must not exist)")
        parser.add_argument("--latest", action="store_true", help="only the latest checkpoint")

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["file"])
        if path.exists():
            raise CommandError(f"{path} exists: an anchor file is written once; choose another name")
        try:
            vkey = log_key().vkey
        except AuditKeyError as exc:
            raise CommandError(str(exc)) from None
        checkpoints = AuditCheckpoint.objects.order_by("size")
        if options["latest"]:
            checkpoints = checkpoints.reverse()[:1]
        count = anchors.anchor_write(path, checkpoints.values_list("note", flat=True).iterator(), vkey)
        if not count:
            path.unlink()
            raise CommandError("the audit log has no checkpoint yet: nothing to export")
        self.stdout.write(self.style.SUCCESS(f"wrote {count} checkpoints to {path} (key {vkey})"))

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.services import Actor
from edge_runtime.airgap.bundle import BundleRefused
from sites.bundles_out import bundle_import


class Command(BaseCommand):
    help = ("Import a bundle out that a node of an air-gapped site wrote with `edge-runtime export-bundle`: its "
            "report, audit entries, telemetry and query answers, verified with the node's identity key. Importing "
            "the same file again changes nothing; the receipt goes back to the node in the site's next bundle in.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", metavar="FILE", help="the bundle (FILE, or its first part FILE.001)")

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["file"])
        if not path.exists() and not path.with_name(f"{path.name}.001").exists():
            raise CommandError(f"{path} does not exist")
        try:
            taken = bundle_import(actor=Actor.system("bundle_import"), path=path)
        except BundleRefused as exc:
            raise CommandError(f"refused {path}: {exc}; nothing was taken") from None
        except OSError as exc:
            raise CommandError(f"{path} cannot be read: {exc.strerror or exc}") from None
        bundle = taken.bundle
        node = bundle.node
        who = f"node {node.name} of {bundle.site.slug}" if node else bundle.site.slug
        if taken.again:
            self.stdout.write(f"bundle out {bundle.sequence} of {who} was imported already "
                              f"({bundle.recorded_at:%Y-%m-%d %H:%M} UTC): nothing changed")
            return
        s = bundle.summary
        self.stdout.write(self.style.SUCCESS(
            f"imported bundle out {bundle.sequence} of {who}, written {bundle.made_at:%Y-%m-%d %H:%M} UTC: "
            f"{s['audit_entries']} audit entries ({s['audit']}), {s['telemetry_items']} telemetry item(s), "
            f"{s['answers']} query answer(s); report {s['report']}"))
        for note in s.get("notes", []):
            self.stdout.write(self.style.WARNING(f"note: {note}"))

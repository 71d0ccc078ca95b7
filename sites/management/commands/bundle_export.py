from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.services import Actor
from sites.bundles import DEFAULT_VALID_FOR, bundle_export, next_sequence
from sites.models import Site
from sites.services import SitesError

_SIZE = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """``4G``, ``700M``, ``1048576``: a size in bytes (binary units)."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size (a number of bytes, or with K, M, G or T)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


class Command(BaseCommand):
    help = ("Write the next signed bundle for a site: its nodes' desired states, the model artifacts the site has "
            "not confirmed holding, its policy, the queries waiting for it and the receipts of what its nodes sent "
            "out. A node imports it with `edge-runtime import-bundle FILE`.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--site", required=True, metavar="SLUG", help="the site the bundle is for")
        parser.add_argument("--output", "-o", metavar="FILE",
                            help="the file to write (must not exist; default: <slug>-in-<sequence>.ewb here)")
        parser.add_argument("--full", action="store_true",
                            help="carry every artifact the site's desired states name, held or not")
        parser.add_argument("--part-size", metavar="SIZE",
                            help="split into FILE.001, FILE.002, ... of this size (e.g. 4G) for removable media")
        parser.add_argument("--valid-days", type=float, default=DEFAULT_VALID_FOR.days,
                            help=f"days until the bundle expires (default {DEFAULT_VALID_FOR.days})")

    def handle(self, *args: Any, **options: Any) -> None:
        site = Site.objects.filter(slug=options["site"]).first()
        if site is None:
            raise CommandError(f"no site with the slug {options['site']!r}")
        part_size = None
        if options["part_size"]:
            try:
                part_size = parse_size(options["part_size"])
            except ValueError as exc:
                raise CommandError(f"--part-size: {exc}") from None
        expected = None if options["output"] else next_sequence(site)
        path = Path(options["output"] or f"{site.slug}-in-{expected}.ewb")
        if path.exists() or path.with_name(f"{path.name}.001").exists():
            raise CommandError(f"{path} exists: choose another name (a bundle never overwrites a file)")
        if not path.parent.is_dir():
            raise CommandError(f"{path.parent} is not a directory")
        try:
            made = bundle_export(actor=Actor.system("bundle_export"), site=site, path=path, full=options["full"],
                                 part_size=part_size, valid_for=dt.timedelta(days=options["valid_days"]),
                                 expected_sequence=expected)
        except SitesError as exc:
            raise CommandError(f"no bundle was written: {exc.message}") from None
        except OSError as exc:
            raise CommandError(f"{path} cannot be written: {exc.strerror or exc}") from None
        bundle = made.bundle
        summary = bundle.summary
        self.stdout.write(f"bundle in {bundle.sequence} for site {site.slug}: {summary['nodes']} node(s), "
                          f"{summary['artifacts']} artifact(s) ({summary['artifact_bytes']} bytes), "
                          f"{summary['queries']} query(ies); expires {bundle.expires_at:%Y-%m-%d %H:%M} UTC")
        for p in made.paths:
            self.stdout.write(self.style.SUCCESS(f"wrote {p} ({p.stat().st_size} bytes)"))

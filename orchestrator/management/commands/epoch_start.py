"""``manage.py epoch_start --reason "..."``: start a new epoch of desired-state generations.

Run it after restoring the database from a backup: the restored generations
may be lower than what nodes already applied, and nodes accept a later
epoch's state whatever its generation. Every node is republished in it.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.services import Actor
from orchestrator import rotation


class Command(BaseCommand):
    help = "Start a new epoch of desired-state generations (after restoring a database backup)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--reason", required=True,
                            help="why, for the audit trail (e.g. 'restored backup of 1 May')")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            epoch = rotation.epoch_start(actor=Actor.system("epoch_start"), reason=options["reason"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"started epoch {epoch}; every node republished in it")

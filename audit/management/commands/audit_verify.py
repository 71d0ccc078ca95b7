from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from audit.services import audit_verify


class Command(BaseCommand):
    help = "Recompute the audit hash chain and name the first record that does not match."

    def handle(self, *args: Any, **options: Any) -> None:
        checked, broken = audit_verify()
        if broken is not None:
            raise CommandError(
                f"audit chain broken at record #{broken.seq}: {broken.reason} "
                f"({checked} records verified before it)"
            )
        self.stdout.write(self.style.SUCCESS(f"audit chain intact: {checked} records verified"))

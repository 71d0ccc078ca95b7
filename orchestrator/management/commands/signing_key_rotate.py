"""``manage.py signing_key_rotate``: replace the signing key with one the old key endorses.

Nodes follow on their next sync: every desired state carries the chain of
endorsements, a node verifies it from the key it pinned and pins the new one.
The old key's file stays beside the new one as ``<file>.retired-<fingerprint>``.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from audit.services import Actor
from orchestrator import keys, rotation


class Command(BaseCommand):
    help = "Replace the control plane's signing key with a new one, endorsed by the old one."

    def handle(self, *args: Any, **options: Any) -> None:
        before = keys.current(fresh=True).fingerprint
        after = rotation.signing_key_rotate(actor=Actor.system("signing_key_rotate"))
        trust = keys.current(fresh=True)
        self.stdout.write(f"rotated the signing key {before[:16]} -> {after[:16]} (full fingerprint {after}); "
                          f"epoch {trust.epoch} started, every node republished")

"""The orchestration layer's rows: the signing keys, the epochs, and each node's signed desired state."""

from __future__ import annotations

import uuid

from django.db import models

from core.permissions import RestrictedQuerySet, Scope

# -- trust: the signing keys and the epochs their generations count in ------------------


class SigningKey(models.Model):
    """Every key this control plane has signed with, in order: the current one has no ``retired_at``.

    The private key lives in a file (``EDGEWISE_SIGNING_KEY_PATH``), never
    here. A row is the proof that the control plane already signed with a key,
    so a missing file is an error rather than a new key nodes would refuse.
    ``endorsement`` is the previous key's signed statement of this one
    (``edge_runtime.protocol.KeyEndorsement``), empty for the first key.
    """

    fingerprint = models.CharField(max_length=64, unique=True)
    public_key = models.CharField(max_length=64)
    endorsement = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField()
    retired_at = models.DateTimeField(null=True, blank=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    class Meta:
        ordering = ["created_at", "pk"]

    def __str__(self) -> str:
        return f"{self.fingerprint[:16]}{' (retired)' if self.retired_at else ''}"


class Epoch(models.Model):
    """A span in which desired-state generations only rise (see ``edge_runtime.protocol.DesiredState``).

    A new one starts with the first signature on a database, on every key
    rotation, and when an operator starts one after restoring a backup; nodes
    accept a later epoch's state whatever its generation.
    """

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    started_at = models.DateTimeField()
    key_fingerprint = models.CharField(max_length=64)
    reason = models.CharField(max_length=200)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    class Meta:
        ordering = ["-started_at", "-pk"]

    def __str__(self) -> str:
        return f"epoch {self.uuid} since {self.started_at:%Y-%m-%d %H:%M:%S} ({self.reason})"


# -- desired state: what each node should run, as signed (orchestrator.desired_state) ------


class DesiredState(models.Model):
    """The signed desired state of one node, as last published.

    ``payload`` is the canonical JSON exactly as signed, so a sync hands it out
    without signing again. ``content_hash`` covers the payload minus its
    generation and timestamp: publishing identical content is a no-op, and
    only a real change moves the generation.
    """

    node = models.OneToOneField("sites.Node", on_delete=models.CASCADE, related_name="desired")
    generation = models.PositiveIntegerField(default=0)
    content_hash = models.CharField(max_length=64)
    payload = models.TextField()
    signature = models.CharField(max_length=200)
    key_fingerprint = models.CharField(max_length=64)
    # The epoch (orchestrator.models.Epoch uuid) the generation counts in; "" before epochs.
    epoch = models.CharField(max_length=64, blank=True, default="")
    published_at = models.DateTimeField()

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("node__site")

    class Meta:
        # The table it has had since it was part of the sites app.
        db_table = "sites_desiredstate"

    def __str__(self) -> str:
        return f"{self.node} @ {self.generation}"

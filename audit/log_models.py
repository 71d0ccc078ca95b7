"""The Merkle logs' tables: the subtree hashes of every log, and the nodes' logs as the control plane witnessed them.

Imported by :mod:`audit.models`, so that Django finds these models.
"""

from __future__ import annotations

from django.db import models

from core.permissions import RestrictedQuerySet, Scope

# The control plane's own log in TreeNode (a node's log is named by the node's uuid).
CONTROL_PLANE_LOG = "control-plane"


class TreeNode(models.Model):
    """The hash of one perfect subtree of a Merkle log: ``2**level`` leaves from ``index * 2**level``.

    Level 0 holds the leaf hashes. Written once, never changed; what makes any
    proof of any log one indexed lookup (:class:`audit.trees.TreeStore`).
    """

    log = models.CharField(max_length=64)
    level = models.PositiveSmallIntegerField()
    index = models.BigIntegerField()
    hash = models.BinaryField(max_length=32)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["log", "level", "index"], name="audit_treenode_unique")]

    def __str__(self) -> str:
        return f"{self.log} {self.level}/{self.index}"


class NodeLogState(models.TextChoices):
    OK = "ok", "Consistent"
    FORKED = "forked", "Forked"


class NodeLog(models.Model):
    """What the control plane, as its witness, holds of one node's audit log."""

    node_uuid = models.UUIDField(unique=True)
    site_uuid = models.UUIDField(db_index=True)
    origin = models.CharField(max_length=200)
    # Entries stored (0..stored-1) and the frontier of their tree (hex hashes, cover(0, stored)).
    stored = models.BigIntegerField(default=0)
    frontier = models.JSONField(default=list)
    # The last checkpoint the control plane cosigned: its size, root (hex) and the note with both signatures.
    cosigned_size = models.BigIntegerField(default=0)
    cosigned_root = models.CharField(max_length=64, blank=True)
    cosigned_note = models.TextField(blank=True)
    cosigned_at = models.DateTimeField(null=True, blank=True)
    state = models.CharField(max_length=10, choices=NodeLogState.choices, default=NodeLogState.OK)
    forked_at = models.DateTimeField(null=True, blank=True)
    fork_reason = models.CharField(max_length=500, blank=True)
    # The signed checkpoint that proved the fork (the node's own signature on a history it cannot have).
    fork_evidence = models.TextField(blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("site_uuid", key="uuid", bypass="audit.view_auditevent")

    def __str__(self) -> str:
        return f"audit log of node {self.node_uuid}"


class NodeLogCheckpoint(models.Model):
    """A checkpoint of a node's log that the control plane cosigned (one per size it grew to)."""

    node_uuid = models.UUIDField()
    site_uuid = models.UUIDField(db_index=True)
    size = models.BigIntegerField()
    root = models.CharField(max_length=64)
    # The node's signed checkpoint with the control plane's cosignature.
    note = models.TextField()
    cosigned_at = models.DateTimeField()

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("site_uuid", key="uuid", bypass="audit.view_auditevent")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["node_uuid", "size"], name="audit_nodelogcheckpoint_unique")]

    def __str__(self) -> str:
        return f"node {self.node_uuid} checkpoint {self.size}"


class NodeLogEntry(models.Model):
    """One entry of a node's audit log, exactly as the node logged it (its leaf hash covers these fields)."""

    node_uuid = models.UUIDField()
    site_uuid = models.UUIDField(db_index=True)
    seq = models.BigIntegerField()  # the node's seq, from 1: leaf index seq - 1
    at = models.CharField(max_length=40)
    created_at = models.DateTimeField(db_index=True)  # ``at`` parsed, for filtering and ordering
    action = models.CharField(max_length=80, db_index=True)
    detail = models.TextField()  # canonical JSON, as the node stored it
    prev_hash = models.CharField(max_length=64)
    received_at = models.DateTimeField()

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("site_uuid", key="uuid", bypass="audit.view_auditevent")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["node_uuid", "seq"], name="audit_nodelogentry_unique")]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"node {self.node_uuid} #{self.seq} {self.action}"

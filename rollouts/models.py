"""Rollouts: a model version taken across the estate wave by wave, as a state machine in the database.

See the ``rollouts`` package for the whole story. The tables keep the
names they had when rollouts were part of the orchestrator app. The rows here are the
state: :class:`Rollout` (one per rollout, its plan and where it stands),
:class:`RolloutNode` (each planned node and what was done to it),
:class:`RolloutEvent` (one per transition: the console's timeline) and
:class:`HealthSample` (serving counters nodes reported, which gates turn into
windows).
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from core.permissions import RestrictedQuerySet, Scope


class RolloutState(models.TextChoices):
    PENDING_APPROVAL = "pending_approval", "Pending approval"  # planned; waiting for the approvals its policy requires
    READY = "ready", "Ready"  # planned and approved (or needing none); an operator starts it
    PROGRESSING = "progressing", "Progressing"  # a wave is being applied or baking; ticks advance it
    PAUSED = "paused", "Paused"  # stopped by an operator, an inconclusive gate or offline nodes; resume continues
    ROLLING_BACK = "rolling_back", "Rolling back"  # every touched node is being put back to its previous version
    SUCCEEDED = "succeeded", "Succeeded"  # every wave promoted: the version is the target's (terminal)
    FAILED = "failed", "Failed"  # a gate or a node failed; rolled back (terminal)
    ABORTED = "aborted", "Aborted"  # an operator aborted; rolled back (terminal)
    REJECTED = "rejected", "Rejected"  # an approver rejected the plan; nothing was touched (terminal)


ACTIVE_STATES = (RolloutState.PROGRESSING, RolloutState.PAUSED, RolloutState.ROLLING_BACK)
OPEN_STATES = (RolloutState.PENDING_APPROVAL, RolloutState.READY, *ACTIVE_STATES)
TERMINAL_STATES = (RolloutState.SUCCEEDED, RolloutState.FAILED, RolloutState.ABORTED, RolloutState.REJECTED)


class WavePhase(models.TextChoices):
    STARTING = "starting", "Starting"  # the next wave's nodes are about to be switched
    UPDATING = "updating", "Updating"  # switched; waiting for the nodes to report the new version serving
    BAKING = "baking", "Baking"  # every reachable node serves it; the bake time runs and the gate watches


class PauseKind(models.TextChoices):
    NONE = "", "—"
    OPERATOR = "operator", "Operator"  # resumed by an operator
    GATE = "gate", "Inconclusive gate"  # resumed by an operator; the wave bakes again and is judged again
    NODE_OFFLINE = "node_offline", "Node offline"  # a wave node stayed offline past the timeout (policy: pause)
    FLEET_OFFLINE = "fleet_offline", "Target offline"  # resumes by itself once enough of the target is back


class RolloutKind(models.TextChoices):
    ROLLOUT = "rollout", "Rollout"  # planned in waves on the rollouts page
    # The model page's Deploy: one wave with the policy's gate, started as soon as it may be; once it
    # succeeds its sites and nodes keep the version as deployments.
    DEPLOY = "deploy", "Deploy"


class Rollout(models.Model):
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    kind = models.CharField(max_length=10, choices=RolloutKind.choices, default=RolloutKind.ROLLOUT)
    version = models.ForeignKey("models_registry.ModelVersion", on_delete=models.PROTECT, related_name="rollouts")
    # {"regions": [slug], "sites": [slug], "nodes": [uuid], "labels": {k: v}, "roles": [role]}
    target = models.JSONField(default=dict)
    # edge_runtime.policy.rollout.Strategy as JSON.
    strategy = models.JSONField(default=dict)
    # {"waves": [[node uuid]], "excluded": [{"node", "name", "reason", "rule"}], "policies": {...}}
    plan = models.JSONField(default=dict)
    plan_hash = models.CharField(max_length=64)
    sites = models.ManyToManyField("sites.Site", related_name="+", blank=True)
    approvals_required = models.PositiveSmallIntegerField(default=0)
    approval_role = models.CharField(max_length=20, blank=True)
    approval_rules = models.JSONField(default=list, blank=True)
    placement_policy_version = models.PositiveIntegerField(default=0)
    rollout_policy_version = models.PositiveIntegerField(default=0)

    state = models.CharField(max_length=20, choices=RolloutState.choices, default=RolloutState.PENDING_APPROVAL,
                             db_index=True)
    current_wave = models.PositiveIntegerField(default=0)
    wave_phase = models.CharField(max_length=10, choices=WavePhase.choices, default=WavePhase.STARTING)
    wave_started_at = models.DateTimeField(null=True, blank=True)
    bake_started_at = models.DateTimeField(null=True, blank=True)
    pause_kind = models.CharField(max_length=20, choices=PauseKind.choices, default=PauseKind.NONE, blank=True)
    # Where a rollback ends: failed or aborted.
    end_state = models.CharField(max_length=20, choices=RolloutState.choices, blank=True)
    reason = models.TextField(blank=True)
    last_gate = models.JSONField(null=True, blank=True)

    # The tick chain: a tick whose id is not this one is stale and exits.
    tick = models.UUIDField(null=True, blank=True)
    next_tick_at = models.DateTimeField(null=True, blank=True, db_index=True)

    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("sites")

    class Meta:
        db_table = "orchestrator_rollout"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"rollout of {self.version}" if self.version_id else "rollout"

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def waves(self) -> list[list[str]]:
        return list(self.plan.get("waves") or [])


class NodeState(models.TextChoices):
    PENDING = "pending", "Pending"  # not touched yet
    UPDATING = "updating", "Updating"  # its desired state names the new version; waiting for it to serve
    UPDATED = "updated", "Updated"  # reports the new version serving
    FAILED = "failed", "Failed"  # reported the new version failed or refused
    SKIPPED = "skipped", "Skipped"  # offline past the wave's timeout; never given the new version
    ROLLING_BACK = "rolling_back", "Rolling back"  # its desired state is its previous version again; not confirmed
    ROLLED_BACK = "rolled_back", "Rolled back"  # confirmed back on its previous version (or without the model)


# Node states in which a rollout's version is assigned to the node.
ASSIGNED_NODE_STATES = (NodeState.UPDATING, NodeState.UPDATED, NodeState.FAILED)


class RolloutNode(models.Model):
    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="nodes")
    node = models.ForeignKey("sites.Node", on_delete=models.CASCADE, related_name="rollout_nodes")
    wave = models.PositiveIntegerField()
    position = models.PositiveIntegerField(default=0)
    state = models.CharField(max_length=20, choices=NodeState.choices, default=NodeState.PENDING)
    # The version it served before (empty: none), for the console and to confirm a rollback.
    previous_version = models.CharField(max_length=50, blank=True)
    assigned_at = models.DateTimeField(null=True, blank=True)
    # The desired-state generation that carries this node's latest change by the rollout: what it
    # reports is only believed once it applied at least this generation.
    generation = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)
    detail = models.TextField(blank=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("node__site")

    class Meta:
        db_table = "orchestrator_rolloutnode"
        ordering = ["wave", "position"]
        constraints = [models.UniqueConstraint(fields=["rollout", "node"], name="rollout_node_once")]
        indexes = [models.Index(fields=["node", "state"])]

    def __str__(self) -> str:
        return f"{self.rollout_id}/{self.node_id}: {self.state}"


class RolloutEvent(models.Model):
    """One transition of a rollout or of one of its nodes: the timeline."""

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="events")
    node = models.ForeignKey("sites.Node", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    kind = models.CharField(max_length=40)
    from_state = models.CharField(max_length=20, blank=True)
    to_state = models.CharField(max_length=20, blank=True)
    wave = models.IntegerField(null=True, blank=True)
    message = models.TextField(blank=True)
    data = models.JSONField(null=True, blank=True)
    actor = models.CharField(max_length=160, blank=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("rollout__sites")

    class Meta:
        db_table = "orchestrator_rolloutevent"
        ordering = ["at", "pk"]

    def __str__(self) -> str:
        return f"{self.kind}: {self.from_state or '∅'} → {self.to_state}"


class HealthSample(models.Model):
    """Cumulative serving counters one node reported for one model version at one time."""

    node = models.ForeignKey("sites.Node", on_delete=models.CASCADE, related_name="+")
    model = models.CharField(max_length=100)
    version = models.CharField(max_length=50)
    at = models.DateTimeField()
    requests = models.BigIntegerField()
    errors = models.BigIntegerField()
    latency_bounds = models.JSONField(default=list)
    latency_counts = models.JSONField(default=list)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("node__site")

    class Meta:
        db_table = "orchestrator_healthsample"
        ordering = ["at", "pk"]
        indexes = [models.Index(fields=["node", "model", "version", "at"])]

    def __str__(self) -> str:
        return f"{self.node_id} {self.model}@{self.version} {self.requests}/{self.errors} at {self.at}"

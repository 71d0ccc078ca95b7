"""What a rollout's end leaves behind beyond its own rows.

* Its version is marked rolled back when the rollout starts rolling back (a
  failed gate or node, or an operator's abort) and the mark is cleared when a
  rollout of it succeeds; version pickers show the mark and never default to
  such a version (``ModelVersion.rolled_back_at``).
* A deploy (``RolloutKind.DEPLOY``) that succeeds keeps its version on its
  sites and nodes as deployments, so a node enrolled there later gets it too.
"""

from __future__ import annotations

from audit.services import Actor
from models_registry import services as registry
from rollouts.models import Rollout, RolloutKind, RolloutState
from sites.models import Node, Site


def rollout_outcome(rollout: Rollout, to: str, *, actor: Actor, message: str) -> None:
    """Called by every state transition of ``rollout``, in its transaction."""
    version = rollout.version
    started = rollout.started_at is not None
    if to == RolloutState.ROLLING_BACK or (to in (RolloutState.FAILED, RolloutState.ABORTED) and started
                                           and version.rolled_back_at is None):
        ended = RolloutState(rollout.end_state or to).label.lower()
        registry.version_outcome_record(version=version, rolled_back=True, note=f"rollout {ended}: {message}")
    elif to == RolloutState.SUCCEEDED:
        registry.version_outcome_record(version=version, rolled_back=False)
        if rollout.kind == RolloutKind.DEPLOY:
            target = rollout.target
            sites = list(Site.objects.filter(slug__in=target.get("sites") or []))
            nodes = list(Node.objects.filter(uuid__in=target.get("nodes") or [], revoked_at__isnull=True)
                         .select_related("site"))
            if sites or nodes:
                registry.deployment_create(actor=actor, version=version, sites=sites, nodes=nodes)

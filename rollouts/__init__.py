"""Canary rollouts: a model version taken across the estate wave by wave, under policy and approval.

The pieces:

* :mod:`.planning`: the target's nodes, placement through the one evaluator
  (``edge_runtime.policy.placement``) with a reason for every excluded node,
  waves (``edge_runtime.policy.rollout.plan_waves``), and the plan's hash;
* :mod:`.services`: what people do (create, change, approve, reject, start,
  pause, resume, promote now, abort), each in one transaction with its event
  and audit record;
* :mod:`.engine`: the ticks that move a rollout along (Celery task
  ``orchestrator.rollout_advance``, one per tick, and the periodic
  ``orchestrator.rollout_reconcile`` that restarts a rollout whose worker
  died; the task names predate this app and stay, so queued ticks survive
  an upgrade);
* :mod:`.health`: serving samples reported by nodes and the one
  ``model_health`` read the gates use;
* :mod:`.selectors`: what rollouts assign to each node, and the console's reads.

States (``rollouts.models.RolloutState``)::

    pending_approval ──approvals──► ready ──start──► progressing ◄──resume── paused
          │    ▲                      │                │  │  ▲──pause/gate/offline──┘
          │    └─plan changed/expired─┘                │  └─ last wave promoted ──► succeeded
          └─reject─► rejected                          └─ gate failed / abort ──► rolling_back ──► failed | aborted
    (abort from pending_approval or ready ends aborted at once)

Inside ``progressing`` each wave goes ``starting`` (switch its nodes: their
desired state now names the new version; the previous version's health is
sampled first) → ``updating`` (wait for every node to report the version
serving; a node offline past ``offline_timeout_s`` is skipped or pauses the
rollout as the strategy says; a node online but silent that long, or one
that reports the version failed, fails the rollout) → ``baking`` (for
``bake_s``; the gate is evaluated on every tick and a conclusive failure rolls
back at once; at the end a pass promotes, an inconclusive gate pauses).
While ``max_offline_fraction`` of the target is offline at once the rollout
pauses instead of judging, and resumes by itself once they are back.

Precedence: a rollout's version reaches a node as an *assignment*
(``RolloutNode`` in state updating/updated/failed) which wins over
deployments made before it (see ``models_registry.selectors``). Rolling back
is taking the assignment away and publishing the node's desired state again:
the node falls back to exactly what it would have without the rollout. After
success the assignments stay: the version is the target's version until a
later deployment or rollout decides otherwise.

Restarts: every tick is one transaction, so a killed worker or control plane
leaves the state of the last committed tick; the reconciler restarts the
chain; node rows only move on a node's own report at or after the
generation that carried the change, so no node is ever in an unknown state.
"""

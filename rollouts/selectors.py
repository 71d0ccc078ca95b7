"""Reads of rollouts: what rollouts assign to a node, the lists a user may see, progress."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Collection
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone

from core.permissions import user_can
from models_registry.models import ModelVersion, VersionStatus
from rollouts.models import ASSIGNED_NODE_STATES, NodeState, Rollout, RolloutNode, RolloutState
from sites.liveness import node_status, shown_status
from sites.models import Connectivity, Node, NodeStatus

UNREACHABLE = (NodeStatus.PENDING, NodeStatus.STALE, NodeStatus.OFFLINE, NodeStatus.REVOKED)


def rollout_assignments(node: Node, cache: dict[Any, Any] | None = None
                        ) -> dict[int, tuple[ModelVersion, dt.datetime, str]]:
    """Per model id, the version the latest rollout assigned to ``node``: (version, assigned at, "rollout <uuid>").

    A node carries a rollout's version while it is being updated, serves it,
    or reported it failed (until the rollback takes it off); a rollout that
    rolled back or was rejected assigns nothing. ``cache``: shared while many
    nodes' states are published, so a site's assignments are read once.
    """
    if cache is None:
        rows = _assignment_rows(RolloutNode.objects.filter(node_id=node.pk)).get(node.pk, [])
    else:
        key = ("rollout_assignments", node.site_id)
        if key not in cache:
            cache[key] = _assignment_rows(RolloutNode.objects.filter(node__site_id=node.site_id))
        rows = cache[key].get(node.pk, [])
    if not rows:
        return {}
    rollouts = _assigning_rollouts({r for r, _ in rows}, cache)
    assigned: dict[int, tuple[ModelVersion, dt.datetime, str]] = {}
    for rollout_id, assigned_at in rows:
        rollout = rollouts.get(rollout_id)
        if rollout is not None:
            assigned[rollout.version.model_id] = (rollout.version, assigned_at, f"rollout {rollout.uuid}")
    return assigned


def _assignment_rows(rows: QuerySet[RolloutNode]) -> dict[int, list[tuple[int, dt.datetime]]]:
    """Per node pk, its (rollout id, assigned at) in the order assigned."""
    # Two steps on purpose (this, then the rollouts): this runs for every node whose desired state is
    # published, and most nodes have no assignment, which the (node, state) index answers without
    # touching any other table.
    by_node: dict[int, list[tuple[int, dt.datetime]]] = {}
    for node_id, rollout_id, assigned_at in (
            rows.filter(state__in=ASSIGNED_NODE_STATES, assigned_at__isnull=False)
            .order_by("assigned_at", "pk").values_list("node_id", "rollout_id", "assigned_at")):
        if assigned_at is not None:  # not null: filtered above
            by_node.setdefault(node_id, []).append((rollout_id, assigned_at))
    return by_node


def _assigning_rollouts(ids: set[int], cache: dict[Any, Any] | None) -> dict[int, Rollout]:
    """The rollouts among ``ids`` that still assign their version, by pk (each read once per ``cache``)."""
    known: dict[int, Rollout | None] = {} if cache is None else cache.setdefault("assigning_rollouts", {})
    missing = ids - known.keys()
    if missing:
        found = {r.pk: r for r in Rollout.objects.filter(pk__in=missing, version__status=VersionStatus.VALID)
                 .exclude(state__in=[RolloutState.FAILED, RolloutState.ABORTED, RolloutState.REJECTED])
                 .select_related("version__model").prefetch_related("version__variants")}
        known.update({pk: found.get(pk) for pk in missing})
    return {pk: rollout for pk in ids if (rollout := known[pk]) is not None}


def unreachable(node: Node, now: dt.datetime | None = None) -> bool:
    return unreachable_at(node.last_seen_at, node.revoked_at, now or timezone.now())


def unreachable_at(last_seen_at: dt.datetime | None, revoked_at: dt.datetime | None, now: dt.datetime) -> bool:
    return node_status(last_seen_at=last_seen_at, revoked=revoked_at is not None, now=now) in UNREACHABLE


def by_bundle(node: Node) -> bool:
    """Whether ``node`` is reached only by bundles (its site is air-gapped): never "offline", only far."""
    return node.site.connectivity == Connectivity.AIR_GAPPED


def offline_share(rollout: Rollout, now: dt.datetime) -> tuple[int, int]:
    """(unreachable, total) among the rollout's nodes that were not skipped and are not reached by bundle."""
    seen = (rollout.nodes.exclude(state=NodeState.SKIPPED).exclude(node__site__connectivity=Connectivity.AIR_GAPPED)
            .values_list("node__last_seen_at", "node__revoked_at"))
    flags = [unreachable_at(last, revoked, now) for last, revoked in seen]
    return sum(flags), len(flags)


def rollout_list(*, user: Any, state: str | None = None) -> QuerySet[Rollout]:
    """Rollouts ``user`` may see: those touching at least one site they may view."""
    rollouts = Rollout.objects.select_related("version__model", "requested_by").order_by("-created_at")
    if state:
        rollouts = rollouts.filter(state=state)
    return rollouts.restrict(user)


def rollout_get(*, user: Any, rollout_uuid: Any) -> Rollout | None:
    return rollout_list(user=user).filter(uuid=rollout_uuid).first()


def rollout_sites(rollout: Rollout, site_ids: Collection[int] | None = None) -> list[Any]:
    """The sites the rollout touches (``site_ids``: only those)."""
    sites = rollout.sites.select_related("region").order_by("name")
    return list(sites if site_ids is None else sites.filter(pk__in=site_ids))


def user_may(user: Any, action: str, rollout: Rollout) -> bool:
    """``action`` ("operate", "approve", "administer") on every site the rollout touches."""
    sites = rollout_sites(rollout)
    return bool(sites) and all(user_can(user, action, site) for site in sites)  # type: ignore[arg-type]


def approval_role_held(user: Any, role: str, rollout: Rollout) -> bool:
    """Does ``user`` hold ``role`` for every site of ``rollout``? Admin: administer; Approver: approve."""
    if not user.is_authenticated or not user.is_active:
        return False
    if role == "Admin":
        return user.is_superuser or user.groups.filter(name="Admin").exists() or user_may(user, "administer", rollout)
    return user_may(user, "approve", rollout)


def approval_inbox(*, user: Any) -> list[Rollout]:
    """Rollouts waiting for approvals that ``user`` may give (never their own)."""
    waiting = rollout_list(user=user, state=RolloutState.PENDING_APPROVAL).exclude(requested_by=user)
    return [r for r in waiting if approval_role_held(user, r.approval_role or "Approver", r)]


def rollout_progress(rollout: Rollout, site_ids: Collection[int] | None = None) -> dict[str, Any]:
    """Counts of node states and the share of planned nodes that finished their part (``site_ids``: of the
    nodes at those sites only, with how many others there are)."""
    rows = rollout.nodes.all() if site_ids is None else rollout.nodes.filter(node__site_id__in=site_ids)
    counts = Counter(rows.values_list("state", flat=True))
    hidden = 0 if site_ids is None else rollout.nodes.exclude(node__site_id__in=site_ids).count()
    total = sum(counts.values())
    done = counts[NodeState.UPDATED] + counts[NodeState.SKIPPED]
    if rollout.state in (RolloutState.ROLLING_BACK, RolloutState.FAILED, RolloutState.ABORTED):
        done = counts[NodeState.ROLLED_BACK]
        touched = done + counts[NodeState.ROLLING_BACK]
        percent = round(100 * done / touched) if touched else 100
    else:
        percent = round(100 * done / total) if total else 0
    return {"total": total, "counts": {state: counts.get(state, 0) for state in NodeState.values},
            "percent": percent, "hidden": hidden, "excluded": len(rollout.plan.get("excluded") or [])}


def rollout_waves(rollout: Rollout, site_ids: Collection[int] | None = None) -> list[dict[str, Any]]:
    """Per wave: its nodes with their state and what they report, for the rollout page (``site_ids``: only
    the nodes at those sites, with how many others the wave has)."""
    rows = list(rollout.nodes.select_related("node__site").order_by("wave", "position"))
    sizes = Counter(r.wave for r in rows)
    if site_ids is not None:
        rows = [r for r in rows if r.node.site_id in site_ids]
    now = timezone.now()
    waves: list[dict[str, Any]] = []
    for index, _ in enumerate(rollout.waves):
        members = [r for r in rows if r.wave == index]
        waves.append({
            "index": index,
            "label": "canary" if index == 0 else f"wave {index}",
            "hidden": sizes[index] - len(members),
            "current": index == rollout.current_wave and rollout.state in (RolloutState.PROGRESSING,
                                                                            RolloutState.PAUSED),
            "nodes": [{"row": r, "status": shown_status(node_status(last_seen_at=r.node.last_seen_at,
                                                                    revoked=r.node.revoked_at is not None, now=now),
                                                        connectivity=r.node.site.connectivity),
                       "reported": _reported(r.node, rollout.version.model.slug)} for r in members],
        })
    return waves


def _reported(node: Node, model: str) -> dict[str, Any] | None:
    for status in (node.actual_state or {}).get("models") or []:
        if isinstance(status, dict) and status.get("name") == model:
            return status
    return None

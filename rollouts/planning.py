"""Planning a rollout: the target's nodes, placement with reasons, waves, the plan's hash.

``plan_build`` reads the target's active nodes once (with their sites and
regions), asks the placement evaluator about each, orders the ones that
qualify site by site (region, site, node name) and cuts them into waves.
Every node of the target that does not qualify is listed with the rule and
the reason; none is dropped silently.

The plan is plain JSON and its sha256 (:func:`plan_hash`) is what approvals
bind to: the version's artifact, the target, the strategy, the exact waves,
the exclusions and the policy versions they were decided under. Any change
to one of them is another plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from django.db.models import Q

from edge_runtime.policy import placement as placement_policy
from edge_runtime.policy.placement import PlacementPolicy, PolicyInvalid, parse_document
from edge_runtime.policy.rollout import RolloutPolicy, Strategy, plan_waves
from models_registry.models import ModelVersion
from models_registry.selectors import version_facts
from policies.selectors import site_facts
from sites.models import Node, NodeRole, Region, Site

LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,60}$")


class PlanningError(Exception):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def _slugs(raw: Any, field: str) -> list[str]:
    if raw in (None, ""):
        return []
    values = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(values, list | tuple):
        raise PlanningError(f"target.{field}: a list of slugs", field=field)
    return sorted({str(v).strip() for v in values if str(v).strip()})


def target_clean(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A target with every region, site and role checked to exist; PlanningError naming the first that does not."""
    unknown = set(raw) - {"regions", "sites", "nodes", "labels", "roles"}
    if unknown:
        raise PlanningError(f"target: unknown key {sorted(unknown)[0]!r} (keys: regions, sites, nodes, labels, "
                            "roles)", field="target")
    regions = _slugs(raw.get("regions"), "regions")
    sites = _slugs(raw.get("sites"), "sites")
    roles = _slugs(raw.get("roles"), "roles")
    known_regions = set(Region.objects.filter(slug__in=regions).values_list("slug", flat=True))
    for slug in regions:
        if slug not in known_regions:
            raise PlanningError(f"target.regions: no region {slug!r}", field="regions")
    known_sites = set(Site.objects.filter(slug__in=sites).values_list("slug", flat=True))
    for slug in sites:
        if slug not in known_sites:
            raise PlanningError(f"target.sites: no site {slug!r}", field="sites")
    for role in roles:
        if role not in NodeRole.values:
            raise PlanningError(f"target.roles: unknown role {role!r}; roles are {', '.join(NodeRole.values)}",
                                field="roles")
    nodes = _node_uuids(raw.get("nodes"))
    labels = raw.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise PlanningError("target.labels: an object of label: value", field="labels")
    for key, value in labels.items():
        if not LABEL.match(str(key)) or not isinstance(value, str | int | float) or not str(value):
            raise PlanningError(f"target.labels: {key!r}={value!r} is not a label (letters, digits, '_.-')",
                                field="labels")
    cleaned = {"regions": regions, "sites": sites, "labels": {str(k): str(v) for k, v in sorted(labels.items())},
               "roles": roles}
    # Only when given, so that a plan's target (and its hash) without nodes stays as it was.
    return {**cleaned, "nodes": nodes} if nodes else cleaned


def _node_uuids(raw: Any) -> list[str]:
    """Node uuids, each an active node's; PlanningError naming the first that is not."""
    values = _slugs(raw, "nodes")
    for value in values:
        try:
            uuid.UUID(value)
        except ValueError:
            raise PlanningError(f"target.nodes: {value!r} is not a node id", field="nodes") from None
    active = {str(u) for u in Node.objects.filter(uuid__in=values, revoked_at__isnull=True)
              .values_list("uuid", flat=True)}
    for value in values:
        if str(uuid.UUID(value)) not in active:
            raise PlanningError(f"target.nodes: no active node {value}", field="nodes")
    return sorted(str(uuid.UUID(v)) for v in values)


def target_describe(target: Mapping[str, Any]) -> str:
    parts = []
    if target.get("regions"):
        parts.append("regions " + ", ".join(target["regions"]))
    if target.get("sites"):
        parts.append("sites " + ", ".join(target["sites"]))
    if target.get("nodes"):
        parts.append(f"{len(target['nodes'])} chosen node(s)")
    where = " and ".join(parts) if parts else "every site"
    if target.get("labels"):
        where += " labelled " + ", ".join(f"{k}={v}" for k, v in target["labels"].items())
    if target.get("roles"):
        where += " (" + ", ".join(target["roles"]) + " nodes)"
    return where


def strategy_clean(policy: RolloutPolicy, overrides: Mapping[str, Any] | None) -> Strategy:
    """The policy's default strategy with ``overrides`` applied, validated; PlanningError naming the field."""
    data = policy.defaults.model_dump(mode="json")
    for key, value in (overrides or {}).items():
        data[key] = value
    try:
        return parse_document(Strategy, data)
    except PolicyInvalid as exc:
        raise PlanningError(f"strategy.{exc}", field="strategy") from exc


def target_nodes(target: Mapping[str, Any]) -> list[Node]:
    """Active nodes the target selects: in its regions or sites (every site if neither), with its labels and roles."""
    # Site and region only: placement needs no desired state, and loading every node's signed payload
    # would cost more than the planning itself.
    nodes = Node.objects.filter(revoked_at__isnull=True).select_related("site__region")
    regions, sites, chosen = target.get("regions") or [], target.get("sites") or [], target.get("nodes") or []
    if regions or sites or chosen:
        nodes = nodes.filter(Q(site__region__slug__in=regions) | Q(site__slug__in=sites) | Q(uuid__in=chosen))
    if target.get("roles"):
        nodes = nodes.filter(role__in=target["roles"])
    labels = target.get("labels") or {}
    # Labels are compared here rather than in SQL so that the embedded SQLite install behaves the same.
    return [n for n in nodes if all(str((n.site.labels or {}).get(k)) == v for k, v in labels.items())]


@dataclasses.dataclass
class Plan:
    document: dict[str, Any]
    nodes: dict[str, Node]
    sites: list[Site]

    @property
    def waves(self) -> list[list[str]]:
        return list(self.document["waves"])

    @property
    def excluded(self) -> list[dict[str, str]]:
        return list(self.document["excluded"])

    @property
    def hash(self) -> str:
        return plan_hash(self.document)


def plan_hash(document: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def plan_build(*, version: ModelVersion, target: Mapping[str, Any], strategy: Strategy,
               placement: tuple[int, PlacementPolicy], rollout_policy_version: int,
               nodes: list[Node] | None = None) -> Plan:
    """The plan of a rollout of ``version`` to ``target`` (``nodes``: the target's nodes, if already loaded)."""
    placement_version, policy = placement
    facts = version_facts(version)
    candidates = target_nodes(target) if nodes is None else nodes
    included: list[Node] = []
    excluded: list[dict[str, str]] = []
    site_cache: dict[int, placement_policy.SiteFacts] = {}
    for node in candidates:
        site = site_cache.get(node.site_id)
        if site is None:
            site = site_cache[node.site_id] = site_facts(node.site)
        decision = placement_policy.place(policy, site, placement_policy.node_facts(node.role, node.hardware), facts)
        if decision.allowed:
            included.append(node)
        else:
            excluded.append({"node": str(node.uuid), "name": f"{node.site.slug}/{node.name}",
                             "rule": decision.rule, "reason": decision.reason})
    included.sort(key=lambda n: (n.site.region.slug, n.site.slug, n.name))
    excluded.sort(key=lambda e: e["name"])
    waves = plan_waves([str(n.uuid) for n in included], canary=strategy.canary_nodes,
                       percentages=strategy.percentages)
    document = {
        "model": version.model.slug,
        "version": version.version,
        "version_uuid": str(version.uuid),
        "sha256": version.sha256,
        "classification": version.model.classification,
        "target": dict(target),
        "strategy": strategy.model_dump(mode="json"),
        "waves": waves,
        "excluded": excluded,
        "placement_policy_version": placement_version,
        "rollout_policy_version": rollout_policy_version,
    }
    sites: dict[int, Site] = {}
    for node in included:
        sites.setdefault(node.site_id, node.site)
    return Plan(document=document, nodes={str(n.uuid): n for n in included}, sites=list(sites.values()))

"""Reads of the model registry: placement of versions on nodes, and what nodes report.

Placement rules, in order, for every model deployed (directly or through its
site) to a node:

1. the newest deployed version of the model wins (by upload time); but a
   rollout that assigned the node a version of the model (see
   ``rollouts``) wins over deployments made before that
   assignment: the later decision about a node wins. A rollout that rolls
   back drops its assignments, so the node falls back to what it had;
2. the node must meet the version's requirements, as the one placement
   evaluator (``edge_runtime.policy.placement``) decides under the placement
   policy in force: the model's classification may not exceed the site's
   clearance nor break a placement rule, the node's reported memory must reach
   ``min_memory_mb``, its role must be listed (when roles are listed) and it
   must report every required execution provider. A node that does not
   qualify gets nothing for that model, and the reason is reported;
3. the variant: ``int8`` for nodes with role ``device`` or under 4096 MB of
   memory when the version allows quantization and a variant exists, else the
   original.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

from django.db.models import Q, QuerySet

from edge_runtime import protocol
from edge_runtime.policy import placement as placement_policy
from models_registry.models import Deployment, Model, ModelVariant, ModelVersion, VersionStatus
from policies.selectors import placement_policy_current, site_facts
from sites.models import Node, Site
from sites.selectors import ProviderFlag, provider_flag

SMALL_NODE_MEMORY_MB = 4096


@dataclasses.dataclass(frozen=True)
class Placement:
    """What one node gets for one model: a variant, or the reason it gets nothing."""

    node: Node
    version: ModelVersion
    variant: str | None
    reason: str = ""
    # Where the version comes from: "deployment", or "rollout <uuid>".
    source: str = "deployment"

    @property
    def placed(self) -> bool:
        return self.variant is not None


def version_facts(version: ModelVersion) -> placement_policy.ModelFacts:
    return placement_policy.model_facts(
        version.model.classification, min_memory_mb=version.min_memory_mb, node_roles=version.node_roles or (),
        required_providers=version.required_providers or ())


def placement_decision(version: ModelVersion, node: Node,
                       policy: placement_policy.PlacementPolicy | None = None) -> placement_policy.Decision:
    """The placement evaluator's decision for ``version`` on ``node`` (policy: the one in force)."""
    if policy is None:
        policy = placement_policy_current()[1]
    return placement_policy.place(policy, site_facts(node.site), placement_policy.node_facts(node.role, node.hardware),
                                  version_facts(version))


def exclusion_reason(version: ModelVersion, node: Node, policy: placement_policy.PlacementPolicy | None = None) -> str:
    """Why ``node`` may not run ``version`` ("" when it may)."""
    return placement_decision(version, node, policy).reason


def choose_variant(version: ModelVersion, node: Node, variants: list[ModelVariant]) -> ModelVariant | None:
    """The variant ``node`` gets, or None for the original."""
    small = node.role == "device" or int((node.hardware or {}).get("memory_mb") or 0) < SMALL_NODE_MEMORY_MB
    if version.allow_quantized and small:
        return next((v for v in variants if v.kind == "int8"), None)
    return None


# Per model id, a version assigned to a node over its deployments: (version, assigned at, where from,
# as "rollout <uuid>"). The rollouts app registers its assignments here; a later assignment wins over
# deployments made before it (rule 1).
# ``cache`` is shared while many nodes' states are published: a source may read a whole site's
# assignments once there.
AssignmentSource = Callable[[Node, dict[Any, Any] | None], dict[int, tuple[ModelVersion, dt.datetime, str]]]
_assignment_sources: list[AssignmentSource] = []


def assignment_source_register(source: AssignmentSource) -> None:
    """Add a source of assignments; called once, from the registering app's ``AppConfig.ready()``."""
    if source not in _assignment_sources:
        _assignment_sources.append(source)


def _assigned(node: Node, cache: dict[Any, Any] | None) -> dict[int, tuple[ModelVersion, dt.datetime, str]]:
    """Every source's assignments for ``node``; the latest assignment of a model wins."""
    assigned: dict[int, tuple[ModelVersion, dt.datetime, str]] = {}
    for source in _assignment_sources:
        for model_id, entry in source(node, cache).items():
            if model_id not in assigned or entry[1] >= assigned[model_id][1]:
                assigned[model_id] = entry
    return assigned


def _active_deployments() -> QuerySet[Deployment]:
    return Deployment.objects.filter(removed_at__isnull=True, version__status=VersionStatus.VALID).select_related(
        "version__model").prefetch_related("version__variants")


def _deployments_of(node: Node, cache: dict[Any, Any] | None) -> list[Deployment]:
    """The active deployments reaching ``node`` (its own and its site's); with ``cache``, the site's
    are read once for all its nodes."""
    if cache is None:
        return list(_active_deployments().filter(Q(node=node) | Q(site_id=node.site_id)))
    key = ("deployments", node.site_id)
    if key not in cache:
        cache[key] = list(_active_deployments().filter(Q(node__site_id=node.site_id) | Q(site_id=node.site_id)))
    return [d for d in cache[key] if d.node_id in (None, node.pk) and d.site_id in (None, node.site_id)]


def _plan(node: Node, cache: dict[Any, Any] | None = None) -> dict[int, Placement]:
    """Per model id, what ``node`` gets (newest deployed version per model wins, unless a later rollout
    assignment does). ``cache``: shared while many nodes are planned together."""
    deployments = _deployments_of(node, cache)
    newest: dict[int, ModelVersion] = {}
    decided: dict[int, Any] = {}
    for deployment in deployments:
        version = deployment.version
        current = newest.get(version.model_id)
        if current is None or (version.created_at, version.pk) > (current.created_at, current.pk):
            newest[version.model_id] = version
    for deployment in deployments:
        if newest[deployment.version.model_id].pk == deployment.version.pk:
            at = decided.get(deployment.version.model_id)
            decided[deployment.version.model_id] = max(at, deployment.created_at) if at else deployment.created_at
    sources: dict[int, str] = {}
    for model_id, (version, assigned_at, source) in _assigned(node, cache).items():
        if model_id not in newest or assigned_at >= decided[model_id]:
            newest[model_id] = version
            sources[model_id] = source
    plan: dict[int, Placement] = {}
    policy = None
    for model_id, version in newest.items():
        if policy is None:
            policy = _placement_policy(cache)
        source = sources.get(model_id, "deployment")
        reason = exclusion_reason(version, node, policy)
        if reason:
            plan[model_id] = Placement(node=node, version=version, variant=None, reason=reason, source=source)
            continue
        variant = choose_variant(version, node, list(version.variants.all()))
        plan[model_id] = Placement(node=node, version=version, variant=variant.kind if variant else "original",
                                   source=source)
    return plan


def _placement_policy(cache: dict[Any, Any] | None) -> placement_policy.PlacementPolicy:
    if cache is None:
        return placement_policy_current()[1]
    if "placement_policy" not in cache:
        cache["placement_policy"] = placement_policy_current()[1]
    policy: placement_policy.PlacementPolicy = cache["placement_policy"]
    return policy


def desired_model(placement: Placement) -> protocol.DesiredModel:
    version = placement.version
    chosen: Any = version
    if placement.variant not in (None, "original"):
        chosen = next(v for v in version.variants.all() if v.kind == placement.variant)
    return protocol.DesiredModel(
        name=version.model.slug,
        version=version.version,
        variant=placement.variant or "original",
        sha256=chosen.sha256,
        size=chosen.size,
        signature=chosen.signature,
        classification=version.model.classification,
        providers=list(version.preferred_providers),
        required_providers=list(version.required_providers),
        forbidden_providers=list(version.forbidden_providers),
        provider_options=dict(version.provider_options),
        rtol=version.output_rtol,
        atol=version.output_atol,
        finite_inputs=version.finite_inputs,
        max_batch_size=version.max_batch_size,
        max_queue_delay_ms=version.max_queue_delay_ms,
    )


def desired_models_for_node(node: Node, cache: dict[Any, Any] | None = None) -> list[protocol.DesiredModel]:
    """The models ``node`` should serve, sorted by name (part of its signed desired state).

    ``cache``: shared while many nodes' states are published, so a site's deployments and
    assignments are read once for all its nodes.
    """
    if node.revoked_at is not None:
        return []
    placements = [p for p in _plan(node, cache).values() if p.placed]
    return sorted((desired_model(p) for p in placements), key=lambda m: m.name)


def _target_nodes(deployment: Deployment) -> list[Node]:
    node = deployment.node
    if node is not None:
        return [node] if node.revoked_at is None else []
    return list(deployment.target_site.nodes.filter(revoked_at__isnull=True).select_related("site"))


def deployment_placement(deployment: Deployment) -> list[Placement]:
    """Per targeted node: the variant it gets from this deployment, or why it gets none."""
    placements = []
    for node in _target_nodes(deployment):
        planned = _plan(node).get(deployment.version.model_id)
        if deployment.removed_at is not None:
            placements.append(Placement(node, deployment.version, None, "the deployment was removed"))
        elif deployment.version.status != VersionStatus.VALID:
            placements.append(Placement(node, deployment.version, None, "the version is not valid"))
        elif planned is not None and planned.version.pk != deployment.version.pk:
            if planned.source != "deployment":
                reason = f"{planned.source} assigns version {planned.version.version} of this model"
            else:
                reason = f"version {planned.version.version} of this model is newer and wins"
            placements.append(Placement(node, deployment.version, None, reason))
        elif planned is not None:
            placements.append(planned)
    return placements


@dataclasses.dataclass(frozen=True)
class PlacementRow:
    """For the console: what a node should run of a version, and what it says it runs."""

    placement: Placement
    reported: dict[str, Any] | None

    @property
    def node(self) -> Node:
        return self.placement.node

    @property
    def provider_flag(self) -> ProviderFlag | None:
        """Served partly or wholly on CPU although an accelerator was meant: it works, slowly."""
        return provider_flag(self.reported, list(self.placement.version.preferred_providers))

    @property
    def cpu_fallback(self) -> bool:
        flag = self.provider_flag
        return flag is not None and flag.label == "CPU fallback"


def _reported(node: Node, model_slug: str) -> dict[str, Any] | None:
    for status in (node.actual_state or {}).get("models") or []:
        if isinstance(status, dict) and status.get("name") == model_slug:
            return status
    return None


def model_placements(version: ModelVersion, *, user: Any = None) -> list[PlacementRow]:
    """Per node targeted by an active deployment of ``version``: desired and reported state.

    With ``user``, only the nodes they may see.
    """
    rows: dict[int, PlacementRow] = {}
    deployments = version.deployments.filter(removed_at__isnull=True).select_related(
        "version__model", "site", "node__site")
    visible = set(Site.objects.restrict(user).values_list("pk", flat=True)) if user is not None else None
    for deployment in deployments:
        for placement in deployment_placement(deployment):
            node = placement.node
            if node.pk in rows:
                continue
            if visible is not None and node.site_id not in visible:
                continue
            rows[node.pk] = PlacementRow(placement=placement, reported=_reported(node, version.model.slug))
    return sorted(rows.values(), key=lambda r: (r.node.site.name, r.node.name))


def model_list() -> list[dict[str, Any]]:
    """Every model with its latest version (the registry is estate-wide)."""
    models = Model.objects.prefetch_related("versions").order_by("slug")
    return [{"model": m, "latest": max(m.versions.all(), key=lambda v: (v.created_at, v.pk), default=None)}
            for m in models]


def deployment_list(*, user: Any, version: ModelVersion) -> QuerySet[Deployment]:
    """Active deployments of ``version`` whose target site ``user`` may see."""
    return version.deployments.filter(removed_at__isnull=True).select_related("site", "node__site").restrict(user)


def operable_targets(user: Any) -> tuple[QuerySet[Any], QuerySet[Node]]:
    """The sites and active nodes ``user`` may deploy to."""
    sites = Site.objects.order_by("name").restrict(user, "operate")
    nodes = Node.objects.filter(revoked_at__isnull=True).select_related("site").restrict(user, "operate")
    return sites, nodes.order_by("site__name", "name")

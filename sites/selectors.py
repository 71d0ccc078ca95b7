"""Reads for the console: sites, nodes and tokens as the person asking may see them.

Every selector takes the user and narrows through ``policies.permissions.restrict``.
Statuses are derived from ``last_seen_at`` at the time of the read (see
``sites.liveness``), never from the stored status, so a page is never behind
the liveness sweep.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Iterable
from typing import Any

from django.apps import apps
from django.db.models import Count, F, Prefetch, Q, QuerySet
from django.utils import timezone

from orchestrator.models import DesiredState
from sites.bundles import confirmed_artifacts
from sites.liveness import AIR_GAPPED, node_status, shown_confirmed_at, shown_status, site_status
from sites.models import BundleDirection, Connectivity, EnrollmentToken, Node, NodeStatus, Region, Site, SiteBundle

# What the fleet's status filter accepts; the words of ``site_status``.
SITE_STATUSES: list[tuple[str, str]] = [
    ("online", "Online"),  # every live node online
    ("degraded", "Degraded"),  # some live nodes online
    ("offline", "Offline"),  # no live node online
    ("empty", "No nodes"),  # no live node at all (none enrolled, or all revoked)
    (AIR_GAPPED, "Air-gapped"),  # an air-gapped site with live nodes: it has no link to be online by
]


@dataclasses.dataclass(frozen=True)
class SiteRow:
    site: Site
    nodes_online: int
    nodes_total: int
    last_seen_at: dt.datetime | None
    status: str
    # When the site's link was last confirmed: the newest sync or telemetry of its live nodes.
    confirmed_at: dt.datetime | None = None


@dataclasses.dataclass(frozen=True)
class NodeRow:
    node: Node
    status: str
    hardware_summary: str
    desired_generation: int | None

    @property
    def in_sync(self) -> bool:
        return (self.desired_generation is not None and self.node.applied_generation == self.desired_generation
                and not self.refusing)

    @property
    def refusing(self) -> dict[str, Any] | None:
        """The desired state the node says it refuses now (generation, reason, at), reported on every sync."""
        refusing = (self.node.actual_state or {}).get("refusing")
        return refusing if isinstance(refusing, dict) else None


@dataclasses.dataclass(frozen=True)
class TokenRow:
    token: EnrollmentToken
    state: str

    @property
    def usable(self) -> bool:
        return self.state == "active"


def region_list(*, user: Any) -> QuerySet[Region]:
    """The regions with at least one site ``user`` may see (all of them for estate-wide roles)."""
    return Region.objects.order_by("name").restrict(user)


def site_list(*, user: Any, region: str | None = None, status: str | None = None, q: str | None = None,
              now: dt.datetime | None = None) -> list[SiteRow]:
    """The sites ``user`` may see, with live node counts and a status each.

    Two queries whatever the number of sites: the sites, and their nodes'
    liveness columns in one prefetch. ``status`` filters on the derived status,
    so it is applied after the counts are computed.
    """
    now = now or timezone.now()
    sites = Site.objects.select_related("region").restrict(user)
    if region:
        sites = sites.filter(region__slug=region)
    if q:
        q = q.strip()
        sites = sites.filter(Q(name__icontains=q) | Q(slug__icontains=q) | Q(jurisdiction__icontains=q))
    liveness = (Node.objects.only("id", "site_id", "last_seen_at", "revoked_at")
                .annotate(telemetry_at=F("telemetry_stream__received_at")))
    with_nodes = sites.prefetch_related(Prefetch("nodes", queryset=liveness, to_attr="liveness_nodes"))
    rows = [_site_row(site, now) for site in with_nodes.order_by("name")]
    if status:
        rows = [row for row in rows if row.status == status]
    return rows


def _site_row(site: Site, now: dt.datetime) -> SiteRow:
    nodes: list[Node] = site.liveness_nodes  # type: ignore[attr-defined]
    statuses = [node_status(last_seen_at=n.last_seen_at, revoked=n.revoked_at is not None, now=now) for n in nodes]
    live = [n for n, s in zip(nodes, statuses, strict=True) if s != NodeStatus.REVOKED]
    seen = [n.last_seen_at for n in live if n.last_seen_at is not None]
    telemetry = [n.telemetry_at for n in live]  # type: ignore[attr-defined]
    return SiteRow(
        site=site,
        nodes_online=sum(1 for s in statuses if s == NodeStatus.ONLINE),
        nodes_total=len(live),
        last_seen_at=max(seen) if seen else None,
        status=shown_status(site_status(statuses), connectivity=site.connectivity),
        confirmed_at=shown_confirmed_at(connectivity=site.connectivity, last_seen=seen, telemetry=telemetry),
    )


def node_list(*, user: Any, site: Site, now: dt.datetime | None = None) -> list[NodeRow]:
    """The nodes of ``site``, active ones first, with live status and desired generation."""
    now = now or timezone.now()
    nodes = Node.objects.filter(site=site).select_related("site", "desired").restrict(user)
    rows = [node_row(node, now=now) for node in nodes.order_by("revoked_at", "name")]
    return rows


def node_row(node: Node, *, now: dt.datetime | None = None) -> NodeRow:
    now = now or timezone.now()
    status = node_status(last_seen_at=node.last_seen_at, revoked=node.revoked_at is not None, now=now)
    return NodeRow(
        node=node,
        status=shown_status(status, connectivity=node.site.connectivity),
        hardware_summary=hardware_summary(node.hardware),
        desired_generation=desired_generation(node),
    )


def desired_generation(node: Node) -> int | None:
    try:
        return node.desired.generation
    except DesiredState.DoesNotExist:
        return None


# The provider every onnxruntime build has; serving on it when the model
# prefers another one is a fallback the operator should see.
CPU_PROVIDER = "CPUExecutionProvider"


@dataclasses.dataclass(frozen=True)
class ProviderFlag:
    """A model that does not run where it should: the badge's words, and why (the node's own account)."""

    label: str
    detail: str


def provider_flag(reported: dict[str, Any] | None, preferred: list[str]) -> ProviderFlag | None:
    """The warning a reported ModelStatus earns: part or all of the graph on CPU although an accelerator was meant.

    A node reports its placement (``partial``, ``cpu_fallback``) and why each
    provider was given up; an older node only its provider, which is a fallback
    when the model preferred another.
    """
    if not reported or reported.get("state") != "serving":
        return None
    placement = reported.get("placement") or ""
    why = str(reported.get("fallback") or "")
    if placement == "partial":
        label = f"Partial: {reported.get('cpu_nodes', 0)} of {reported.get('graph_nodes', 0)} nodes on CPU"
        return ProviderFlag(label, why or f"{reported.get('provider')} runs the rest of the graph")
    if placement == "cpu_fallback":
        return ProviderFlag("CPU fallback", why or "no accelerator of this node could run it")
    wanted = [p for p in preferred if p != CPU_PROVIDER]
    if not placement and wanted and reported.get("provider") == CPU_PROVIDER:
        return ProviderFlag("CPU fallback", f"The model prefers {', '.join(wanted)}, which this node cannot use")
    return None


@dataclasses.dataclass(frozen=True)
class NodeModelRow:
    """One model on a node: what the control plane asked for joined with what the node says.

    ``desired`` is the entry of the node's signed desired state (absent for a
    model the node still reports after it was taken away); ``reported`` the
    node's ``ModelStatus`` (absent until its first sync that mentions the model).
    """

    name: str
    desired: dict[str, Any] | None
    reported: dict[str, Any] | None

    @property
    def state(self) -> str:
        if self.reported:
            return str(self.reported.get("state") or "")
        # Desired but not mentioned by the node yet: its next sync will say.
        return "pending" if self.desired else ""

    @property
    def serving_version(self) -> str:
        """The version that answers requests now ("" when none does)."""
        if not self.reported:
            return ""
        if self.reported.get("state") == "serving":
            return str(self.reported.get("version") or "")
        return str(self.reported.get("serving_version") or "")

    @property
    def error(self) -> str:
        if self.reported and self.reported.get("state") in ("failed", "refused"):
            return str(self.reported.get("error") or "")
        return ""

    @property
    def preferred_providers(self) -> list[str]:
        return [str(p) for p in (self.desired or {}).get("providers") or []]

    @property
    def provider_flag(self) -> ProviderFlag | None:
        """Runs, but partly or wholly on CPU although an accelerator was meant: slower than planned."""
        return provider_flag(self.reported, self.preferred_providers)

    @property
    def cpu_fallback(self) -> bool:
        flag = self.provider_flag
        return flag is not None and flag.label == "CPU fallback"

    @property
    def in_sync(self) -> bool:
        if not self.desired or not self.reported:
            return False
        return (self.reported.get("version"), self.reported.get("variant", "original"), self.reported.get("state")) == (
            self.desired.get("version"), self.desired.get("variant", "original"), "serving")


def desired_payload(node: Node) -> dict[str, Any]:
    """The node's published desired state as a dict ({} before the first publication)."""
    try:
        payload = node.desired.payload
    except DesiredState.DoesNotExist:
        return {}
    try:
        parsed = json.loads(payload)
    except ValueError:
        # Only the control plane writes it, as canonical JSON; a row edited by hand shows as empty.
        return {}
    return parsed if isinstance(parsed, dict) else {}


def node_models(node: Node) -> list[NodeModelRow]:
    """Every model ``node`` should serve or still reports, desired ones first, each by name.

    The node's own report is taken as it is (it is validated on the way in by
    the agent protocol); entries that are not objects with a name are skipped.
    """
    desired = {str(m["name"]): m for m in desired_payload(node).get("models") or []
               if isinstance(m, dict) and m.get("name")}
    reported = {str(m["name"]): m for m in (node.actual_state or {}).get("models") or []
                if isinstance(m, dict) and m.get("name")}
    rows = [NodeModelRow(name=name, desired=entry, reported=reported.get(name))
            for name, entry in sorted(desired.items())]
    rows += [NodeModelRow(name=name, desired=None, reported=entry)
             for name, entry in sorted(reported.items()) if name not in desired]
    return rows


def hardware_summary(hardware: dict[str, Any]) -> str:
    """"8 cores · 15.6 GiB · CUDA, CPU": what an operator needs to place models, on one line."""
    parts: list[str] = []
    if hardware.get("cpu_cores"):
        parts.append(f"{hardware['cpu_cores']} cores")
    if hardware.get("memory_mb"):
        parts.append(memory_label(int(hardware["memory_mb"])))
    providers = [str(p).removesuffix("ExecutionProvider") for p in hardware.get("execution_providers") or []]
    if providers:
        parts.append(", ".join(providers))
    return " · ".join(parts) or "not reported"


def memory_label(mb: int) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb} MiB"


def token_list(*, user: Any, site: Site, now: dt.datetime | None = None) -> list[TokenRow]:
    """The enrollment tokens of ``site``, newest first, with their state now."""
    now = now or timezone.now()
    tokens = EnrollmentToken.objects.filter(site=site).restrict(user).order_by("-created_at")
    return [TokenRow(token=t, state=token_state(t, now=now)) for t in tokens]


def token_state(token: EnrollmentToken, *, now: dt.datetime) -> str:
    # The same order of reasons as services._token_usable, so the list says
    # what an enrollment with this token would be told.
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at <= now:
        return "expired"
    if token.uses >= token.max_uses:
        return "used up"
    return "active"


def node_names(uuids: Iterable[str]) -> dict[str, str]:
    """Node uuid -> "site / node" for the nodes among ``uuids`` (the audit trail shows names, not uuids)."""
    wanted = [u for u in uuids if _is_uuid(u)]
    rows = Node.objects.filter(uuid__in=wanted).values_list("uuid", "name", "site__name")
    return {str(u): f"{site} / {name}" for u, name, site in rows}


def node_identity_keys(uuids: Iterable[str]) -> dict[str, str]:
    """Node uuid -> its registered identity key (base64), for the nodes among ``uuids`` that hold one."""
    wanted = [u for u in uuids if _is_uuid(u)]
    rows = Node.objects.filter(uuid__in=wanted).exclude(identity_key="").values_list("uuid", "identity_key")
    return {str(u): key for u, key in rows}


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


# -- bundles of an air-gapped site -------------------------------------------

BUNDLE_HISTORY_SHOWN = 10


@dataclasses.dataclass(frozen=True)
class NodeBundles:
    """One live node of a site as the bundles panel shows it: its last bundle out, what waits to go to it."""

    node: Node
    last_out: SiteBundle | None
    desired_generation: int | None
    # The models its desired state names that the site has not confirmed holding (the next bundle in carries them).
    missing: list[dict[str, Any]]
    # Whether a bundle in made since its last bundle out was imported carries that bundle's receipt back.
    receipt_sent: bool

    @property
    def generation_pending(self) -> bool:
        """Its desired state is newer than what it last confirmed applying."""
        return self.desired_generation is not None and self.node.applied_generation < self.desired_generation

    @property
    def missing_bytes(self) -> int:
        return sum(int(m.get("size") or 0) for m in self.missing)


@dataclasses.dataclass(frozen=True)
class SiteBundles:
    last_in: SiteBundle | None
    last_in_expired: bool
    nodes: list[NodeBundles]
    history: list[SiteBundle]
    # Queries waiting for this site's answer, by whether a bundle in carried them yet (None: no queries app).
    queries_not_sent: int | None
    queries_awaiting: int | None

    @property
    def nodes_behind(self) -> int:
        return sum(1 for n in self.nodes if n.generation_pending)

    @property
    def missing(self) -> dict[str, int]:
        """The artifacts the next bundle in carries, each once whichever nodes need it: sha256 -> bytes."""
        return {str(m.get("sha256")): int(m.get("size") or 0) for n in self.nodes for m in n.missing}

    @property
    def missing_bytes(self) -> int:
        return sum(self.missing.values())

    @property
    def receipts_waiting(self) -> int:
        """Nodes whose last bundle out was imported after the last bundle in was made: no receipt sent yet."""
        return sum(1 for n in self.nodes if n.last_out is not None and not n.receipt_sent)


def site_bundles(*, site: Site, now: dt.datetime | None = None) -> SiteBundles | None:
    """The bundles panel of ``site`` (resolved for the user already); None for a connected site that never had one."""
    now = now or timezone.now()
    history = list(SiteBundle.objects.filter(site=site).select_related("node", "by")
                   .order_by("-recorded_at", "-pk")[:BUNDLE_HISTORY_SHOWN])
    if site.connectivity != Connectivity.AIR_GAPPED and not history:
        return None
    last_in = SiteBundle.objects.filter(site=site, direction=BundleDirection.IN).order_by("-sequence").first()
    nodes = Node.objects.filter(site=site, revoked_at__isnull=True).select_related("site", "desired").order_by("name")
    not_sent, awaiting = _bundle_queries(site, now)
    return SiteBundles(
        last_in=last_in, last_in_expired=bool(last_in and last_in.expires_at and last_in.expires_at <= now),
        nodes=[_node_bundles(node, last_in) for node in nodes], history=history,
        queries_not_sent=not_sent, queries_awaiting=awaiting,
    )


def _node_bundles(node: Node, last_in: SiteBundle | None) -> NodeBundles:
    last_out = SiteBundle.objects.filter(node=node, direction=BundleDirection.OUT).order_by("-sequence").first()
    held = confirmed_artifacts(node)
    models = [m for m in desired_payload(node).get("models") or [] if isinstance(m, dict)]
    return NodeBundles(
        node=node, last_out=last_out, desired_generation=desired_generation(node),
        missing=[m for m in models if m.get("sha256") not in held],
        receipt_sent=bool(last_out and last_in and last_in.made_at > last_out.recorded_at),
    )


def _bundle_queries(site: Site, now: dt.datetime) -> tuple[int | None, int | None]:
    """Open queries of ``site`` waiting for a bundle: not carried by a bundle in yet, and carried but unanswered.

    The queries app sits above this one, so its model is named by label (as ``core.permissions`` names the
    sites app's): a read for the page, and nothing when the app is not installed.
    """
    try:
        query_site = apps.get_model("queries", "QuerySite")
    except LookupError:
        return None, None
    counts = query_site.objects.filter(site=site, state="bundle", deadline__gt=now).aggregate(
        not_sent=Count("pk", filter=Q(sent_at__isnull=True)), awaiting=Count("pk", filter=Q(sent_at__isnull=False)))
    return int(counts["not_sent"]), int(counts["awaiting"])

"""Bundles for air-gapped sites, the control plane's side (the format: ``edge_runtime.airgap.bundle``).

:func:`bundle_export` writes one signed file for a site: for each enrolled
node, the answer a sync would have given it (its signed desired state, the
queries waiting for it, the audit answer and receipt of the last bundle it
sent out) and the model artifacts the site has not confirmed holding; with
``full``, every artifact its nodes' desired states name. The sequence number
rises by one per site and is allocated under the site's row lock, in the
transaction that records the bundle: a bundle that could not be written
leaves no row, no file, and no query marked as sent.

What a site "holds" is what it last confirmed: the artifacts each node listed
in the inventory of the last bundle it sent out, and those a connected node
reports serving. Never what the last bundle in carried: that bundle may never
have reached the site.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from audit.services import Actor, audit_record
from edge_runtime import protocol
from edge_runtime.airgap.bundle import bundle_digest
from edge_runtime.airgap.writing import Source, write_bundle
from edge_runtime.protocol.airgap import BundleReceipt, NodeBundle
from orchestrator import features, keys
from orchestrator.desired_state import desired_state_publish, signed_desired_state
from orchestrator.models import DesiredState
from sites.models import BundleDirection, Node, Site, SiteBundle
from sites.services import SitesError

DEFAULT_VALID_FOR = dt.timedelta(days=30)
MAX_VALID_FOR = dt.timedelta(days=3650)


@dataclasses.dataclass(frozen=True)
class Made:
    """A bundle written: its row and the files it was written to (one, or its parts in order)."""

    bundle: SiteBundle
    paths: list[Path]


@dataclasses.dataclass
class _Contents:
    sources: list[Source] = dataclasses.field(default_factory=list)
    artifacts: dict[str, int] = dataclasses.field(default_factory=dict)
    queries: int = 0


def bundle_export(*, actor: Actor, site: Site, path: Path, full: bool = False, part_size: int | None = None,
                  valid_for: dt.timedelta = DEFAULT_VALID_FOR, user: Any = None,
                  expected_sequence: int | None = None) -> Made:
    """Write the next bundle in for ``site`` to ``path`` (or its parts); refused with SitesError naming the field.

    With ``expected_sequence`` (the one :func:`next_sequence` gave, say to name the file) it is refused
    unless that is still the sequence it gets: another bundle for the site may have been made meanwhile.
    """
    if not dt.timedelta(hours=1) <= valid_for <= MAX_VALID_FOR:
        raise SitesError("a bundle is valid for between 1 hour and 3650 days", field="valid_for")
    if part_size is not None and part_size < 1024 * 1024:
        raise SitesError("a part holds at least 1 MiB", field="part_size")
    written: list[Path] = []
    try:
        with transaction.atomic():
            site = Site.objects.select_for_update().get(pk=site.pk)
            nodes = list(site.nodes.filter(revoked_at__isnull=True).select_related("site", "desired")
                         .order_by("uuid"))
            if not nodes:
                raise SitesError(f"site {site.slug} has no enrolled node: a bundle in carries its nodes' states",
                                 field="site")
            sequence = next_sequence(site)
            if expected_sequence is not None and sequence != expected_sequence:
                raise SitesError(f"bundle in {expected_sequence} for site {site.slug} was made meanwhile; the next "
                                 f"one is {sequence}", field="sequence")
            contents = _contents(site, nodes, actor=actor, full=full)
            now = timezone.now()
            trust = keys.current()
            meta = {"direction": "in", "site": site.slug, "site_id": str(site.uuid), "sequence": sequence,
                    "created": now, "expires": now + valid_for, "key_chain": list(trust.chain)}
            signed, written = write_bundle(path, meta, contents.sources, keys.signing_key(), part_size=part_size)
            digest = bundle_digest(signed)
            size = sum(p.stat().st_size for p in written)
            summary = {"nodes": len(nodes), "artifacts": len(contents.artifacts),
                       "artifact_bytes": sum(contents.artifacts.values()), "queries": contents.queries,
                       "full": full, "parts": len(written) if part_size else 0}
            bundle = SiteBundle.objects.create(
                site=site, direction=BundleDirection.IN, sequence=sequence, made_at=now, expires_at=now + valid_for,
                digest=digest, size=size, summary=summary, by=user if getattr(user, "pk", None) else None)
            audit_record(actor=actor, action="bundle.export", obj=bundle, site_uuid=site.uuid,
                         after={"sequence": sequence, "digest": digest, "bytes": size, **summary,
                                "expires": (now + valid_for).isoformat()})
    except BaseException:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    return Made(bundle=bundle, paths=written)


def next_sequence(site: Site) -> int:
    """The sequence the next bundle in for ``site`` gets (allocated for good under the site's row lock)."""
    last = SiteBundle.objects.filter(site=site, direction=BundleDirection.IN).aggregate(m=Max("sequence"))
    return int(last["m"] or 0) + 1


def _contents(site: Site, nodes: list[Node], *, actor: Actor, full: bool) -> _Contents:
    contents = _Contents()
    needed: dict[str, int] = {}
    for node in nodes:
        state: DesiredState | None = getattr(node, "desired", None)
        if state is None:
            state = desired_state_publish(node=node, actor=actor)
        answer, receipt = _answer(node, state, actor)
        contents.queries += len(answer.queries)
        entry = NodeBundle(node_id=str(node.uuid), answer=answer, receipt=receipt)
        contents.sources.append(Source.json(f"nodes/{node.uuid}.json", entry.model_dump(mode="json")))
        held = set() if full else confirmed_artifacts(node)
        for model in json.loads(state.payload).get("models", []):
            if model["sha256"] not in held:
                needed[model["sha256"]] = int(model["size"])
    for sha256, size in sorted(needed.items()):
        stored = features.artifact_file(sha256)
        if stored is None:
            raise SitesError(f"the artifact {sha256[:16]}… a node of {site.slug} needs is missing from the store",
                             field="artifacts")
        contents.sources.append(Source(name=f"artifacts/{sha256}", path=stored, sha256=sha256, size=size))
        contents.artifacts[sha256] = size
    return contents


def _answer(node: Node, state: DesiredState, actor: Actor) -> tuple[protocol.SyncResponse, BundleReceipt | None]:
    """What a sync would answer ``node`` now (its desired state always), and the receipt of its last bundle out."""
    actual = protocol.ActualState.model_validate(node.actual_state or {})
    sync = features.NodeSync(node=node, actual=actual, actor=actor)
    for feature in features.node_features():
        feature.answer(sync)
    last_out = (SiteBundle.objects.filter(node=node, direction=BundleDirection.OUT).exclude(receipt={})
                .order_by("-sequence").first())
    receipt = audit = None
    if last_out is not None:
        receipt = BundleReceipt.model_validate(last_out.receipt["receipt"])
        audit = last_out.receipt.get("audit")
    answer = protocol.SyncResponse(generation=state.generation, desired=signed_desired_state(state),
                                   sync_interval_s=settings.SYNC_INTERVAL_S, audit=audit, **sync.answer)
    return answer, receipt


def confirmed_artifacts(node: Node) -> set[str]:
    """The artifacts ``node`` last confirmed holding: its last bundle out's inventory, and what it reports serving."""
    held = {m.get("sha256", "") for m in (node.actual_state or {}).get("models", [])
            if isinstance(m, dict) and m.get("state") == "serving"}
    last_out = (SiteBundle.objects.filter(node=node, direction=BundleDirection.OUT).order_by("-sequence")
                .values_list("summary", flat=True).first())
    if last_out:
        held |= {a["sha256"] for a in last_out.get("inventory", {}).get("artifacts", [])}
    held.discard("")
    return held

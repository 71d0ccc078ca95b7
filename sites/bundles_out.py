"""Bundles out of a site, imported at the control plane (the format: ``edge_runtime.airgap.bundle``).

:func:`bundle_import` takes one file a node wrote with ``edge-runtime
export-bundle`` and signed with its identity key. It refuses, with the
reason and before a member is used:

* a bundle in (the control plane's own), one of a node this control plane
  does not know, of a revoked node, or naming another site than the node's;
* one not signed by the node's registered identity key;
* one older than the last bundle out imported from that node (each bundle
  out carries everything the one before did, so the newer one has it all),
  or another file under a sequence already imported;
* an altered, truncated or padded file, or a member that is not what its
  name says.

The same file imported twice changes nothing the second time: it is
recognised by sequence and digest and answered "imported already".

Otherwise, in one transaction: the node's report is recorded as of the time
the bundle was written (unless the control plane heard from the node since),
its audit log uploads are witnessed as a sync's are, its telemetry is stored
(duplicates by sequence number skipped), each feature takes its part (the
query answers), and a :class:`~sites.models.SiteBundle` row keeps what was
taken and the receipt the next bundle in carries back to the node, so it can
forget what is acknowledged. An expired bundle out is still taken: old data
is still the site's data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.db import transaction
from django.db.models import Max
from django.utils import timezone
from pydantic import ValidationError

from audit.models import NodeLog
from audit.services import Actor, audit_record
from audit.witness import node_log_ingest
from edge_runtime import protocol
from edge_runtime.airgap.bundle import (
    BundleRefused,
    Member,
    SignedMeta,
    bundle_digest,
    read_bundle,
    verify_signature,
)
from edge_runtime.protocol.airgap import BundleReceipt, NodeInventory
from orchestrator import features
from orchestrator.realtime import FLEET_GROUP, broadcast
from sites.identity import node_public_key
from sites.models import BundleDirection, Node, SiteBundle
from sites.sync import node_report_carried
from sites.telemetry.services import Submission, telemetry_commit

# The small members are read into memory; a bundle out has no large one (models only travel in).
MAX_MEMBER_BYTES = 2 * 1024 * 1024
# Telemetry frames are stored this many at a time, inside the import's transaction.
FRAMES_PER_COMMIT = 500


@dataclasses.dataclass(frozen=True)
class Taken:
    """A bundle out imported (or recognised as imported already: ``again``)."""

    bundle: SiteBundle
    again: bool = False


class _Staged(Mapping[str, bytes]):
    """The members of a verified bundle, by name, each read from its staging file when asked for (never all
    at once: a node away for months may send many)."""

    def __init__(self, staging: Path, signed: SignedMeta) -> None:
        self._paths = {m.name: staging / f"{n:06d}" for n, m in enumerate(signed.signed.members, start=1)}

    def __getitem__(self, name: str) -> bytes:
        return self._paths[name].read_bytes()

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def parsed(self, prefix: str, model: Any) -> Iterator[Any]:
        """The members under ``prefix``, in name order, each parsed as ``model`` as it is reached."""
        for name in sorted(n for n in self._paths if n.startswith(prefix)):
            yield _parse(self, name, model)


@dataclasses.dataclass
class _Carried:
    report: protocol.SyncRequest
    inventory: NodeInventory
    members: _Staged

    def uploads(self) -> Iterator[protocol.AuditUpload]:
        return self.members.parsed("audit/", protocol.AuditUpload)

    def frames(self) -> Iterator[protocol.TelemetryFrame]:
        return self.members.parsed("telemetry/", protocol.TelemetryFrame)


def bundle_import(*, actor: Actor, path: Path, user: Any = None) -> Taken:
    """Import the bundle out at ``path`` (or its parts); BundleRefused says why not, and nothing was taken."""
    found: dict[str, Node] = {}

    def check(signed: SignedMeta) -> None:
        node, again = _check(signed)
        if again is not None:
            raise _ImportedAlready(again)  # before a member is read: nothing to do
        found["node"] = node

    with _staging() as staging:
        try:
            signed = read_bundle(path, check, _Sink(staging))
        except _ImportedAlready as exc:
            return Taken(bundle=exc.bundle, again=True)
        carried = _read(staging, signed)
        return _take(actor, found["node"], signed, carried, user)


class _ImportedAlready(Exception):
    def __init__(self, bundle: SiteBundle) -> None:
        super().__init__(f"bundle out {bundle.sequence} was imported already")
        self.bundle = bundle


def _check(signed: SignedMeta) -> tuple[Node, SiteBundle | None]:
    """The node that wrote ``signed`` and, for a file imported before, its row; BundleRefused otherwise."""
    meta = signed.signed
    if meta.direction != "out":
        raise BundleRefused(f"this is a bundle in for site {meta.site}, made by a control plane; import a bundle "
                            "a node wrote with edge-runtime export-bundle")
    node = _node(meta.node)
    if node.site.slug != meta.site:
        raise BundleRefused(f"the bundle names site {meta.site}, but node {node.name} belongs to {node.site.slug}")
    if node.revoked_at is not None:
        raise BundleRefused(f"node {node.name} of {node.site.slug} was revoked: nothing it sends is taken")
    key: Ed25519PublicKey | None = node_public_key(node)
    if key is None:
        raise BundleRefused(f"node {node.name} has no identity key registered: its bundle cannot be verified")
    verify_signature(signed, key)
    last = SiteBundle.objects.filter(node=node, direction=BundleDirection.OUT).order_by("-sequence").first()
    if last is not None and meta.sequence <= last.sequence:
        if meta.sequence == last.sequence and bundle_digest(signed) == last.digest:
            return node, last
        if meta.sequence == last.sequence:
            raise BundleRefused(f"node {node.name} wrote another bundle out {meta.sequence}, imported "
                                f"{last.recorded_at:%Y-%m-%d %H:%M} UTC: this one is not that file")
        raise BundleRefused(f"bundle out {meta.sequence} of node {node.name} is older than bundle {last.sequence}, "
                            "imported already, which carried everything this one does")
    return node, None


def _node(node_id: str) -> Node:
    try:
        parsed = uuid.UUID(node_id)
    except ValueError:
        raise BundleRefused(f"the bundle names no node this control plane knows ({node_id[:64]!r})") from None
    node = Node.objects.select_related("site").filter(uuid=parsed).first()
    if node is None:
        raise BundleRefused(f"the bundle was written by node {parsed}, which this control plane does not know")
    return node


@dataclasses.dataclass
class _Sink:
    staging: Path
    count: int = 0

    def __call__(self, member: Member) -> BinaryIO:
        if member.size > MAX_MEMBER_BYTES:
            raise BundleRefused(f"{member.name}: {member.size} bytes, more than a bundle out's member holds "
                                f"({MAX_MEMBER_BYTES})")
        self.count += 1  # by position in the signed list (the order members are read in), never by name
        return (self.staging / f"{self.count:06d}").open("xb")


@contextlib.contextmanager
def _staging() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="edgewise-bundle-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _read(staging: Path, signed: SignedMeta) -> _Carried:
    """The members, each checked against its wire model (BundleRefused names the one that is not) before
    anything is taken; the audit uploads and telemetry frames are read again, one by one, as they are taken."""
    members = _Staged(staging, signed)
    carried = _Carried(report=_parse(members, "report.json", protocol.SyncRequest),
                       inventory=_parse(members, "inventory.json", NodeInventory), members=members)
    for _ in itertools.chain(carried.uploads(), carried.frames()):
        pass
    return carried


def _parse(members: Mapping[str, bytes], name: str, model: Any) -> Any:
    if name not in members:
        raise BundleRefused(f"the bundle lacks {name}: it is no bundle out of a node")
    try:
        return model.model_validate_json(members[name])
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise BundleRefused(f"{name}: {'.'.join(map(str, first['loc'])) or 'the member'}: {first['msg']}") from None


def _take(actor: Actor, node: Node, signed: SignedMeta, carried: _Carried, user: Any) -> Taken:
    meta = signed.signed
    node_actor = Actor("node", str(node.uuid), None)
    with transaction.atomic():
        node = Node.objects.select_for_update(of=("self",)).select_related("site", "desired").get(pk=node.pk)
        last = (SiteBundle.objects.filter(node=node, direction=BundleDirection.OUT).aggregate(m=Max("sequence"))
                ["m"] or 0)
        if meta.sequence <= last:  # another import of this node's bundles committed meanwhile
            raise BundleRefused(f"bundle out {last} of node {node.name} was imported meanwhile; import again to "
                                "see whether this one is still needed")
        reported = node_report_carried(node=node, request=carried.report, as_of=meta.created, actor=node_actor)
        audit_ack, entries = _witness(node, carried.uploads())
        telemetry_items, telemetry_seq = _telemetry(node, carried.frames())
        sync = features.NodeSync(node=node, actual=carried.report.actual, actor=node_actor)
        for feature in features.node_features():
            feature.carried(sync, carried.members)
        receipt = BundleReceipt(sequence=meta.sequence, ingested_at=timezone.now(), telemetry_seq=telemetry_seq,
                                answers=sync.answer.get("answers", []))
        summary = {"report": "taken" if reported else "older than what the node reported since",
                   "audit_entries": entries, "audit": audit_ack.state if audit_ack else "none",
                   "telemetry_items": telemetry_items, "telemetry_seq": telemetry_seq,
                   "answers": len(receipt.answers), "notes": sync.answer.get("notes", []),
                   "inventory": carried.inventory.model_dump(mode="json")}
        bundle = SiteBundle.objects.create(
            site=node.site, node=node, direction=BundleDirection.OUT, sequence=meta.sequence, made_at=meta.created,
            expires_at=meta.expires, digest=bundle_digest(signed), size=sum(m.size for m in meta.members),
            summary=summary, by=user if getattr(user, "pk", None) else None,
            receipt={"receipt": receipt.model_dump(mode="json"),
                     "audit": audit_ack.model_dump(mode="json") if audit_ack else None})
        audit_record(actor=actor, action="bundle.import", obj=bundle, site_uuid=node.site.uuid,
                     after={"node": str(node.uuid), "sequence": meta.sequence, "made_at": meta.created.isoformat(),
                            **{k: v for k, v in summary.items() if k != "inventory"}})
    broadcast(FLEET_GROUP, "fleet.changed", {"site": str(node.site.uuid)})
    return Taken(bundle=bundle)


def _witness(node: Node, uploads: Iterable[protocol.AuditUpload]) -> tuple[protocol.AuditAck | None, int]:
    """Each upload witnessed in order; the last answer, and how many entries were stored."""
    ack: protocol.AuditAck | None = None
    before = NodeLog.objects.filter(node_uuid=node.uuid).values_list("stored", flat=True).first() or 0
    for upload in uploads:
        ack = node_log_ingest(node_uuid=node.uuid, site_uuid=node.site.uuid, public_key=node_public_key(node),
                              key_mismatch=False, upload=upload)
        if ack.state != "ok":
            break  # the rest cannot fit where this one stopped
    if ack is None:
        return None, 0
    return ack, max(0, ack.stored - before)


def _telemetry(node: Node, frames: Iterable[protocol.TelemetryFrame]) -> tuple[int, int]:
    """The frames stored a batch at a time (duplicates skipped): how many items, and the node's high-water mark."""
    items = mark = 0
    it = iter(frames)
    while batch := list(itertools.islice(it, FRAMES_PER_COMMIT)):
        items += sum(len(f.items) for f in batch)
        committed = telemetry_commit(submissions=[
            Submission(node_id=node.pk, node_uuid=str(node.uuid), site_uuid=str(node.site.uuid), frame=frame)
            for frame in batch])
        mark = int(committed.marks.get(node.pk, mark))
    return items, mark

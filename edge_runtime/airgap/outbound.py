"""A bundle out, written by a node: what its syncs would have sent, signed with its identity key.

:func:`export_bundle` (``edge-runtime export-bundle FILE``) writes one file
for the control plane, holding everything this node has that the control
plane has not acknowledged (each bundle out is cumulative: a later one
carries all an earlier one did, so a lost file costs nothing but the trip):

* ``report.json``: the :class:`~edge_runtime.protocol.SyncRequest` the
  running agent last wrote (``bundles/report.json``: actual state, model
  statuses, health, refused desired states), without its audit upload;
* ``audit/<n>.json``: the audit log's entries the control plane lacks, as
  uploads of one checkpoint signed with the node's identity key, each with
  its consistency proofs (``NodeAudit.uploads``);
* ``telemetry/<n>.json``: the telemetry points and gaps not acknowledged,
  as frames in sequence order;
* ``answers/<n>.json``: the answers to federated queries waiting for delivery:
  only what the site's data policy let the query answer (suppressed,
  aggregated), never a dataset's rows;
* ``inventory.json``: the artifacts the node holds and the last bundle in
  it imported, so the next bundle in carries only what it lacks.

What was written is remembered in ``bundles/outbox/<sequence>.json``; the
control plane's receipt in a later bundle in names the sequence it took,
and the node then forgets what that bundle carried (:func:`receipt_taken`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_runtime.airgap.inbound import Bundles
from edge_runtime.airgap.writing import Source, write_bundle
from edge_runtime.audit import AUDIT_FILE, AuditError, NodeAudit, node_log_origin
from edge_runtime.identity_key import NodeKey
from edge_runtime.protocol import MAX_TELEMETRY_ITEMS, ActualState, AuditUpload, SyncRequest
from edge_runtime.protocol.airgap import HeldArtifact, NodeInventory
from edge_runtime.state import StateDir, StateError, write_atomic
from edge_runtime.telemetry.queue import QUEUE_FILE, TelemetryQueue

logger = logging.getLogger("edge_runtime.airgap")

REPORT_FILE = "report.json"
OUTBOX_DIR = "outbox"
# A bundle out is read by the control plane, which gives an old one the same weight as a new one.
OUT_VALID_FOR = dt.timedelta(days=3650)
# The query outbox of the datasets plug-in (edge_runtime.datasets.OUTBOX_FILE).
QUERIES_FILE = "queries.sqlite3"


class Sent(BaseModel):
    """What one bundle out carried (``bundles/outbox/<sequence>.json``): what its receipt lets the node forget."""

    model_config = ConfigDict(extra="ignore")

    sequence: int = Field(ge=1)
    written_at: dt.datetime
    # The last audit upload of the bundle: the control plane's audit answer in the receipt is its answer.
    audit: AuditUpload | None = None
    telemetry_seq: int = 0
    answers: list[str] = Field(default_factory=list)
    # The refused desired states the report carried, as (generation, at).
    refusals: list[tuple[int, str]] = Field(default_factory=list)


@dataclass
class Exported:
    sequence: int
    paths: list[Path]
    audit_entries: int = 0
    telemetry_items: int = 0
    answers: int = 0
    artifacts: int = 0
    notes: list[str] = field(default_factory=list)


def save_report(state: StateDir, request: SyncRequest) -> None:
    """Keep the agent's latest report for the next bundle out (its audit upload is made at export)."""
    bundles = Bundles(state)
    bundles.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = request.model_copy(update={"audit": None}).model_dump_json()
    write_atomic(bundles.path / REPORT_FILE, (body + "\n").encode(), mode=0o600)


def export_bundle(state: StateDir, path: Path, *, part_size: int | None = None,
                  audit: NodeAudit | None = None, now: dt.datetime | None = None) -> Exported:
    """Write this node's next bundle out to ``path`` (or its parts); StateError or ValueError says why not."""
    bundles = Bundles(state)
    identity = state.load_identity()
    key = NodeKey.load_or_create(state.path)
    now = now or dt.datetime.now(dt.UTC)
    with bundles.lock():
        floor = bundles.load()
        sequence = floor.out_sequence + 1
        exported = Exported(sequence=sequence, paths=[])
        sources: list[Source] = [Source.json("report.json", _report(state, bundles, exported).model_dump(mode="json"))]
        report = SyncRequest.model_validate_json(sources[0].data or b"{}")
        sent = Sent(sequence=sequence, written_at=now,
                    refusals=[(r.generation, r.at.isoformat()) for r in report.refusals])
        uploads = _uploads(state, audit, key, node_log_origin(identity.node_id))
        for n, upload in enumerate(uploads, start=1):
            sources.append(Source.json(f"audit/{n:06d}.json", upload.model_dump(mode="json")))
            exported.audit_entries += len(upload.entries)
        sent.audit = uploads[-1] if uploads else None
        frames, sent.telemetry_seq, exported.telemetry_items = _telemetry(state)
        for n, frame in enumerate(frames, start=1):
            sources.append(Source(name=f"telemetry/{n:06d}.json", data=frame.encode()))
        answers = _answers(state)
        sent.answers = list(answers)
        exported.answers = len(answers)
        for n, body in enumerate(answers.values(), start=1):
            sources.append(Source(name=f"answers/{n:06d}.json", data=body.encode()))
        inventory = _inventory(state, floor.in_sequence, sent.answers)
        exported.artifacts = len(inventory.artifacts)
        sources.append(Source.json("inventory.json", inventory.model_dump(mode="json")))
        meta = {"direction": "out", "site": identity.site, "node": identity.node_id, "sequence": sequence,
                "created": now, "expires": now + OUT_VALID_FOR}
        # The outbox record first: a bundle written but not remembered could never be acknowledged.
        outbox = bundles.path / OUTBOX_DIR
        outbox.mkdir(parents=True, exist_ok=True, mode=0o700)
        record = outbox / f"{sequence:012d}.json"
        write_atomic(record, (sent.model_dump_json() + "\n").encode(), mode=0o600)
        try:
            _, exported.paths = write_bundle(path, meta, sources, key.private, part_size=part_size)
        except BaseException:
            record.unlink(missing_ok=True)
            raise
        floor.out_sequence, floor.out_written_at = sequence, now
        bundles.save(floor)
    if audit is not None or (audit := _open_audit(state)) is not None:
        audit.record("bundle.exported", {"sequence": sequence, "audit_entries": exported.audit_entries,
                                         "telemetry_items": exported.telemetry_items, "answers": exported.answers})
    return exported


def _open_audit(state: StateDir) -> NodeAudit | None:
    try:
        return NodeAudit.in_state_dir(state.path)
    except AuditError as exc:
        logger.error("the audit log cannot be opened: %s", exc)
        return None


def _report(state: StateDir, bundles: Bundles, exported: Exported) -> SyncRequest:
    """The agent's last report, or (an agent that never ran) what the status file says."""
    try:
        return SyncRequest.model_validate_json((bundles.path / REPORT_FILE).read_bytes())
    except FileNotFoundError:
        exported.notes.append("the agent has not written a report yet: model statuses are not in this bundle")
    except (OSError, ValidationError) as exc:
        exported.notes.append(f"the agent's last report cannot be read ({' '.join(str(exc).split())[:200]}); "
                              "the status file's figures were sent instead")
    status = state.load_status()
    return SyncRequest(actual=ActualState(applied_generation=status.applied_generation, applied_epoch=status.epoch,
                                          refusing=status.refusing),
                       refusals=list(status.pending_refusals))


def _uploads(state: StateDir, audit: NodeAudit | None, key: NodeKey, origin: str) -> list[AuditUpload]:
    if audit is None and not (state.path / AUDIT_FILE).exists():
        return []
    audit = audit or NodeAudit.in_state_dir(state.path)
    try:
        return audit.uploads(key.private, origin)
    except AuditError as exc:
        raise StateError(f"the audit log cannot be exported: {exc}") from None


def _telemetry(state: StateDir) -> tuple[list[str], int, int]:
    """The unacknowledged telemetry as frames of JSON text, the last sequence number they carry, and how many
    items they hold."""
    if not (state.path / QUEUE_FILE).exists():
        return [], 0, 0
    queue = TelemetryQueue(state.path / QUEUE_FILE)
    try:
        frames: list[str] = []
        after, count = queue.acked_seq, 0
        while batch := queue.pending(after=after, max_items=MAX_TELEMETRY_ITEMS, max_bytes=512 * 1024):
            frames.append('{"type":"telemetry","items":[' + ",".join(item.body for item in batch) + "]}")
            after, count = batch[-1].last_seq, count + len(batch)
        return frames, after, count
    finally:
        queue.close()


def _answers(state: StateDir) -> dict[str, str]:
    """The answers waiting for delivery, by query id, as the JSON a node posts (a partial's NaN kept)."""
    from edge_runtime.datasets import Outbox  # pandas stays unloaded for a node without the queries file

    if not (state.path / QUERIES_FILE).exists():
        return {}
    return {result.query_id: result.model_dump_json() for result in Outbox(state.path / QUERIES_FILE).waiting()}


def _inventory(state: StateDir, in_sequence: int, answers: list[str]) -> NodeInventory:
    held: list[HeldArtifact] = []
    artifacts = state.path / "artifacts"
    if artifacts.is_dir():
        for path in sorted(artifacts.glob("*.onnx")):
            with contextlib.suppress(OSError, ValueError):
                held.append(HeldArtifact(sha256=path.stem, size=path.stat().st_size))
    return NodeInventory(artifacts=held, bundle_in_sequence=in_sequence, answers=answers)


def sent_record(state: StateDir, sequence: int) -> Sent | None:
    """What bundle out ``sequence`` carried, if this node still remembers it."""
    path = Bundles(state).path / OUTBOX_DIR / f"{sequence:012d}.json"
    try:
        return Sent.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


def forget_sent(state: StateDir, upto: int) -> None:
    """Drop the records of bundles out up to ``upto``: their receipt came, a later one would carry the rest."""
    outbox = Bundles(state).path / OUTBOX_DIR
    if not outbox.is_dir():
        return
    for path in outbox.glob("*.json"):
        with contextlib.suppress(ValueError):
            if int(path.stem) <= upto:
                path.unlink(missing_ok=True)

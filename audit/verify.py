"""Verifying the control plane's audit log against its signed checkpoints, in the database and outside it.

:func:`audit_verify` reads every position of the log in order (in batches,
as plain values), recomputes each event's leaf from its fields and compares
it with the event's content hash, its leaf row and the tree's leaf at that
position; it folds the recomputed leaves into a Merkle frontier and, at the
size of every checkpoint it knows (the database's and each anchor file's,
their signatures verified with the log's key), compares the root. What does
not match is named:

* ``altered``: a record whose fields no longer give its hash or its leaf;
* ``moved``: a position whose leaf row differs from the tree's leaf there
  (records reordered, or the tree rewritten);
* ``missing``: a position of the log with no record;
* ``inserted``: a record in no position and not waiting for one;
* ``rewritten``: the log's root at a checkpoint's size differs from the
  signed one (every hash recomputed), with the range of positions it lies in;
* ``fork``: two signed checkpoints of one size with different roots;
* ``tail``: a checkpoint larger than the log (its end was cut off);
* ``truncated``: the log is empty but checkpoints of it exist;
* ``signature``: a checkpoint whose signature fails, or a checkpoint row that
  differs from its own signed note;
* ``checkpoint``: an anchored checkpoint that the database no longer holds;
* ``tree``: stored subtree hashes that differ from the recomputed tree.

A superuser who appends an event and queues it is appending, not rewriting:
it gets the next position and is in every later checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from audit import anchors
from audit.log_key import AuditKeyError, log_key
from audit.log_models import CONTROL_PLANE_LOG, TreeNode
from audit.models import GENESIS_HASH, LEAF_FIELDS, AuditCheckpoint, AuditEvent, AuditLogLeaf, AuditPending, leaf_data
from audit.trees import TreeStore
from edge_runtime import merkle, notes

MAX_PER_KIND = 20  # problems listed per kind (all are counted)
NO_LEAF = b"\0" * merkle.HASH_SIZE


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str
    message: str
    position: int | None = None
    seq: int | None = None


@dataclasses.dataclass
class VerifyReport:
    size: int = 0  # positions the log holds
    checked: int = 0  # records recomputed
    pending: int = 0  # events not yet in the log
    checkpoints: int = 0  # signed checkpoints compared
    problems: list[Problem] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, message: str, position: int | None = None, seq: int | None = None) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= MAX_PER_KIND:
            self.problems.append(Problem(kind, message, position, seq))

    def first(self, kind: str) -> Problem | None:
        return next((p for p in self.problems if p.kind == kind), None)


# size -> [(root, where it was signed)]
Claims = dict[int, list[tuple[bytes, str]]]


def audit_verify(*, anchor_files: Sequence[Path] = (), vkeys: Sequence[str] | None = None,
                 batch_size: int = 10_000) -> VerifyReport:
    """Recompute the log and compare it with every checkpoint of the database and of ``anchor_files``."""
    report = VerifyReport()
    keys = _trusted_vkeys(vkeys, bool(anchor_files))
    claims: Claims = {}
    in_database = _database_claims(keys, claims, report)
    for path in anchor_files:
        _anchor_claims(path, keys, claims, report, in_database)
    report.checkpoints = sum(len(v) for v in claims.values())
    _forks(claims, report)
    _Walk(report, claims, batch_size).run()
    _beyond_the_log(claims, report)
    _inserted(report)
    report.pending = AuditPending.objects.count()
    return report


def _trusted_vkeys(vkeys: Sequence[str] | None, anchored: bool) -> list[str]:
    if vkeys is not None:
        for text in vkeys:
            notes.parse_vkey(text)  # a malformed key is an error naming what is wrong
        return list(vkeys)
    try:
        return [log_key().vkey]
    except AuditKeyError:
        if anchored or AuditCheckpoint.objects.exists():
            raise
        return []


def _open(note: str, keys: Sequence[str]) -> notes.Checkpoint:
    """The checkpoint of a note signed by one of ``keys``; NoteError naming why not."""
    failures: list[str] = []
    for text in keys:
        name, public = notes.parse_vkey(text)
        try:
            _, checkpoint = notes.open_checkpoint(note, name, public)
        except notes.NoteError as exc:
            failures.append(str(exc))
            continue
        if checkpoint.origin != name:
            raise notes.NoteError(f"the checkpoint is of the log {checkpoint.origin!r}, not {name!r}")
        return checkpoint
    raise notes.NoteError("; ".join(failures) or "no key of this log is known to check it with")


def _database_claims(keys: Sequence[str], claims: Claims, report: VerifyReport) -> set[int]:
    sizes: set[int] = set()
    for size, root, note in AuditCheckpoint.objects.order_by("size").values_list("size", "root", "note"):
        source = f"the database's checkpoint of size {size}"
        try:
            checkpoint = _open(note, keys)
        except notes.NoteError as exc:
            report.add("signature", f"{source}: its signature fails ({exc})")
            continue
        if (checkpoint.size, checkpoint.root.hex()) != (size, root):
            report.add("signature", f"{source}: its row says size {size}, root {root}, but its signed note says "
                                    f"size {checkpoint.size}, root {checkpoint.root.hex()}: the row was changed")
        claims.setdefault(checkpoint.size, []).append((checkpoint.root, source))
        sizes.add(checkpoint.size)
    return sizes


def _anchor_claims(path: Path, keys: Sequence[str], claims: Claims, report: VerifyReport,
                   in_database: set[int]) -> None:
    try:
        anchored = anchors.anchors_read(path, keys)
    except (anchors.AnchorError, notes.NoteError) as exc:
        report.add("signature", f"anchor file {path}: {exc}")
        return
    for item in anchored:
        size = item.checkpoint.size
        claims.setdefault(size, []).append((item.checkpoint.root, f"the checkpoint of size {size} in {item.source}"))
        if size not in in_database:
            report.add("checkpoint", f"the checkpoint of size {size} in {item.source} is not in the database "
                                     "(its row was removed)")


def _forks(claims: Claims, report: VerifyReport) -> None:
    for size in sorted(claims):
        roots = {root for root, _ in claims[size]}
        if len(roots) > 1:
            first_root, first = claims[size][0]
            other_root, other = next((r, s) for r, s in claims[size] if r != first_root)
            report.add("fork", f"fork at size {size}: {first} has root {first_root.hex()} but {other} has root "
                               f"{other_root.hex()}")


def _beyond_the_log(claims: Claims, report: VerifyReport) -> None:
    larger = sorted(size for size in claims if size > report.size)
    if not larger:
        return
    size = larger[-1]
    source = claims[size][0][1]
    if report.size == 0:
        report.add("truncated", f"the log is empty but {source} exists: the audit tables were emptied (TRUNCATE)")
    else:
        report.add("tail", f"the log ends at {report.size} records but {source} was signed: records "
                           f"{report.size}..{size - 1} (positions) are missing from its tail")


def _inserted(report: VerifyReport) -> None:
    strays = AuditEvent.objects.filter(log_leaf__isnull=True, pending__isnull=True).order_by("seq")
    for seq in strays.values_list("seq", flat=True)[:MAX_PER_KIND]:
        report.add("inserted", f"the record seq {seq} is in no position of the log and not waiting for one: "
                               "it was inserted past the log", seq=seq)
    extra = strays.count() - min(strays.count(), MAX_PER_KIND)
    if extra:
        report.counts["inserted"] += extra


class _Walk:
    """One pass over the log's positions: recompute, compare, fold."""

    def __init__(self, report: VerifyReport, claims: Claims, batch_size: int) -> None:
        self.report, self.claims, self.batch_size = report, claims, batch_size
        self.frontier = merkle.Frontier()
        self.prev_hash = GENESIS_HASH
        self.agreed = 0  # the largest checkpoint size whose root the log still gives
        self.diverged = False
        self.fields = ("position", "leaf", *(f"event__{name}" for name in LEAF_FIELDS), "event__hash")

    def run(self) -> None:
        self._compare()  # a checkpoint of size 0
        start = 0
        while True:
            rows = list(AuditLogLeaf.objects.filter(position__gte=start).order_by("position")
                        .values_list(*self.fields)[:self.batch_size])
            if not rows:
                break
            tree = {index: bytes(digest) for index, digest in TreeNode.objects.filter(
                log=CONTROL_PLANE_LOG, level=0, index__gte=rows[0][0], index__lte=rows[-1][0]).values_list(
                "index", "hash")}
            for row in rows:
                self._row(row, tree)
            start = rows[-1][0] + 1
        self.report.size = self.frontier.size
        self._check_stored_frontier()

    def _row(self, row: tuple[Any, ...], tree: dict[int, bytes]) -> None:
        position, stored_leaf, *values, digest = row
        while self.frontier.size < position:  # positions with no record (the leaf row or the event removed)
            self._missing(self.frontier.size, tree)
        seq = values[0]
        where = f"position {position} (seq {seq})"
        data = leaf_data(tuple(values))
        leaf = merkle.leaf_hash(data)
        if hashlib.sha256(data).hexdigest() != digest:
            self.report.add("altered", f"{where}: its content does not match its hash: the record was altered",
                            position, seq)
        elif leaf != bytes(stored_leaf):
            self.report.add("altered", f"{where}: its content does not match its leaf in the log: the record was "
                                       "altered and rehashed", position, seq)
        tree_leaf = tree.get(position)
        if tree_leaf is not None and tree_leaf != bytes(stored_leaf):
            self.report.add("moved", f"{where}: the tree holds another leaf at this position: records were "
                                     "reordered or the tree was rewritten", position, seq)
        prev_hash = values[LEAF_FIELDS.index("prev_hash")]
        if prev_hash and prev_hash != self.prev_hash:
            self.report.add("altered", f"{where}: its previous-hash does not match the record before it "
                                       "(old hash chain)", position, seq)
        self.prev_hash = digest
        self.report.checked += 1
        self.frontier.append(leaf)
        self._compare()

    def _missing(self, position: int, tree: dict[int, bytes]) -> None:
        self.report.add("missing", f"position {position}: the record is missing (its event or its leaf row was "
                                   "removed)", position)
        found = tree.get(position)
        self.frontier.append(found if found is not None else NO_LEAF)
        self.prev_hash = ""
        self._compare()

    def _compare(self) -> None:
        claims = self.claims.get(self.frontier.size)
        if not claims or self.diverged:
            return
        root = self.frontier.root()
        wrong = [source for signed, source in claims if signed != root]
        if not wrong:
            self.agreed = self.frontier.size
            return
        self.diverged = True
        size = self.frontier.size
        self.report.add("rewritten", f"the log's root at size {size} is {root.hex()}, not the root of {wrong[0]}: "
                                     f"a record among positions {self.agreed}..{size - 1} was rewritten (the log "
                                     f"agrees with its checkpoints up to size {self.agreed})")

    def _check_stored_frontier(self) -> None:
        if not self.frontier.size:
            return
        try:
            stored = TreeStore(CONTROL_PLANE_LOG).frontier(self.frontier.size)
        except LookupError as exc:
            self.report.add("tree", f"the stored tree is incomplete: {exc}")
            return
        if stored.hashes != self.frontier.hashes:
            self.report.add("tree", f"the stored subtree hashes of the log's {self.frontier.size} records differ "
                                    "from the ones its records give: the tree was rewritten")

"""One log of an auditor's bundle checked on its own: its signed checkpoints, its entries streamed through a
:class:`~edge_runtime.merkle.Frontier`, its consistency proofs, and the heads the control plane recorded of it.

What the bundle holds is described in :mod:`edge_runtime.audit_bundle`. A log
is checked front to back and stops at its first failure, which names the
checkpoint (its number in ``checkpoints.txt``, from 1, and its size) or the
entry (a control plane log position, from 0; a node entry's ``#seq``, from 1)
where it went wrong. Entries are read one line at a time and never held: a
Frontier keeps ``log2(n)`` hashes, so a log of a million entries verifies in
seconds and in a few kilobytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, cast

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from edge_runtime.merkle import EMPTY_ROOT, HASH_SIZE, Frontier, leaf_hash, verify_consistency
from edge_runtime.notes import Checkpoint, NoteError, parse_note, verify_cosignature, verify_signature
from edge_runtime.protocol.audit import MAX_PROOF_HASHES, LogEntry

# The line after each signed note in a checkpoints.txt file.
SEPARATOR = "-----"
# One line of entries.jsonl: a node entry's detail is at most 16 KiB, a control plane event is smaller than this.
MAX_LINE_BYTES = 1 << 20
NODE_HEADS_ACTION = "audit.node_heads"
_HEX = frozenset("0123456789abcdef")


class BundleError(ValueError):
    """What was given is no bundle or inclusion proof at all (a usage error, not a failed verification)."""


class LogFailure(Exception):
    """The first thing wrong with one log; the message names the checkpoint or entry."""


@dataclass
class LogReport:
    """What was found in one log: ``error`` is None when all of it verified."""

    log: str  # "control-plane", or the node's uuid
    origin: str
    site: str | None = None
    entries: int = 0
    checkpoints: int = 0
    last_size: int = 0
    # When the control plane cosigned the last checkpoint (seconds since the epoch), of its own log or a node's.
    last_cosigned_at: int | None = None
    # Heads of this node's log recorded in the control plane's log ("audit.node_heads") that were checked.
    heads_checked: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def uncovered(self) -> int:
        """Entries after the last checkpoint: in the log, not yet vouched for by a signature (not an error)."""
        return max(0, self.entries - self.last_size)


@dataclass(frozen=True)
class LogSpec:
    """Who signs a log's checkpoints and who cosigns them: a node's log is cosigned by the control plane."""

    log: str
    origin: str
    signer: tuple[str, Ed25519PublicKey]
    cosigner: tuple[str, Ed25519PublicKey]

    @property
    def is_node(self) -> bool:
        return self.log != "control-plane"

    def entry(self, index: int) -> str:
        """How an entry is named: by its position in the control plane's log, by its seq in a node's."""
        return f"entry #{index + 1}" if self.is_node else f"position {index}"

    def span(self, start: int, end: int) -> str:
        if end - start == 1:
            return self.entry(start)
        return f"entries #{start + 1}..#{end}" if self.is_node else f"positions {start}..{end - 1}"


@dataclass(frozen=True)
class SignedCheckpoint:
    number: int  # its place in checkpoints.txt, from 1
    checkpoint: Checkpoint
    cosigned_at: int

    def name(self) -> str:
        return f"checkpoint {self.number} (size {self.checkpoint.size})"


@dataclass(frozen=True)
class Head:
    """A node log's size and root as the control plane's log recorded them in an "audit.node_heads" event."""

    position: int
    node: str
    size: int
    root: bytes


@dataclass
class Walk:
    """What streaming a log's entries found: how many there were, and the roots at the sizes asked for."""

    entries: int = 0
    roots: dict[int, bytes] = field(default_factory=dict)


def join_notes(notes: Sequence[str]) -> str:
    """The text of a checkpoints.txt file: each signed note followed by a separator line."""
    for note in notes:
        if not note.endswith("\n"):
            raise ValueError("a signed note ends in a newline")
    return "".join(f"{note}{SEPARATOR}\n" for note in notes)


def split_notes(text: str) -> list[str]:
    """The signed notes of a checkpoints.txt file, oldest first."""
    lines = text.split("\n")
    if lines[-1] != "":
        raise LogFailure("checkpoints.txt does not end with a newline: it was cut or edited")
    notes: list[str] = []
    current: list[str] = []
    for line in lines[:-1]:
        if line == SEPARATOR:
            notes.append("".join(current))
            current = []
        else:
            current.append(line + "\n")
    if current:
        raise LogFailure(f"checkpoints.txt does not end with a {SEPARATOR} line after its last note")
    return notes


def _open(spec: LogSpec, number: int, note_text: str) -> SignedCheckpoint:
    try:
        note = parse_note(note_text)
        checkpoint = Checkpoint.parse(note.text)
    except ValueError as exc:  # a NoteError, or base64 that does not decode
        raise LogFailure(f"checkpoint {number} is malformed: {exc}") from None
    where = f"checkpoint {number} (size {checkpoint.size})"
    if checkpoint.origin != spec.origin:
        raise LogFailure(f"{where} is of another log: its origin is {checkpoint.origin!r}, not {spec.origin!r}")
    try:
        verify_signature(note, *spec.signer)
        cosigned_at = verify_cosignature(note, *spec.cosigner)
    except NoteError as exc:
        raise LogFailure(f"{where}: {exc}") from None
    return SignedCheckpoint(number, checkpoint, cosigned_at)


def read_checkpoints(spec: LogSpec, text: str) -> list[SignedCheckpoint]:
    """The log's checkpoints, each signature and cosignature verified, their sizes never decreasing."""
    found: list[SignedCheckpoint] = []
    for number, note in enumerate(split_notes(text), 1):
        current = _open(spec, number, note)
        if found:
            before = found[-1].checkpoint
            if current.checkpoint.size < before.size:
                raise LogFailure(f"{current.name()} is smaller than checkpoint {number - 1} (size {before.size}): "
                                 "the log shrank")
            if current.checkpoint.size == before.size and current.checkpoint.root != before.root:
                raise LogFailure(f"{current.name()} has the size of checkpoint {number - 1} but another root: "
                                 "the log forked")
        found.append(current)
    return found


def _lines(stream: IO[bytes], member: str) -> Iterator[bytes]:
    # A zip member's own readline is written in Python; a BufferedReader's is several times faster.
    buffered = io.BufferedReader(cast(io.RawIOBase, stream), 1 << 16)
    number = 0
    while line := buffered.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES:
            raise LogFailure(f"line {number} of {member} is longer than {MAX_LINE_BYTES} bytes")
        yield line


def _out_of_order(spec: LogSpec, index: int, found: str) -> LogFailure:
    return LogFailure(f"line {index + 1} holds {found} where {spec.entry(index)} belongs: "
                      "an entry was removed, inserted or moved")


def control_plane_leaves(spec: LogSpec, stream: IO[bytes], member: str, heads: list[Head]) -> Iterator[bytes]:
    """The leaf hashes of control-plane/entries.jsonl, in order; the node heads its events record go to ``heads``."""
    for index, line in enumerate(_lines(stream, member)):
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise LogFailure(f"line {index + 1} of {member} is not JSON") from None
        if (not isinstance(item, dict) or type(item.get("position")) is not int
                or not isinstance(item.get("leaf_data"), str)):
            raise LogFailure(f"line {index + 1} of {member} is not a {{\"position\", \"leaf_data\"}} object")
        if item["position"] != index:
            raise _out_of_order(spec, index, f"position {item['position']}")
        data: str = item["leaf_data"]
        if NODE_HEADS_ACTION in data:
            heads.extend(node_heads(index, data))
        yield leaf_hash(data.encode())


def node_leaves(spec: LogSpec, stream: IO[bytes], member: str) -> Iterator[bytes]:
    """The leaf hashes of a node's entries.jsonl (LogEntry JSON, seq from 1), in order."""
    for index, line in enumerate(_lines(stream, member)):
        try:
            entry = LogEntry.model_validate_json(line)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise LogFailure(f"line {index + 1} of {member} is not a log entry: "
                             f"{where + ': ' if where else ''}{first['msg']}") from None
        if entry.seq != index + 1:
            raise _out_of_order(spec, index, f"entry #{entry.seq}")
        yield entry.leaf_hash()


def node_heads(position: int, data: str) -> list[Head]:
    """The node heads an "audit.node_heads" event records (``after.heads``: {node: [size, root hex]})."""
    try:
        event = json.loads(data)
    except ValueError:
        return []  # the leaf data is what it is; its hash is what the checkpoints vouch for
    if not isinstance(event, dict) or event.get("action") != NODE_HEADS_ACTION:
        return []
    after = event.get("after")
    heads = after.get("heads") if isinstance(after, dict) else None
    if not isinstance(heads, dict):
        raise LogFailure(f"position {position} ({NODE_HEADS_ACTION}) holds no heads object in after.heads")
    found: list[Head] = []
    for node, value in heads.items():
        if (not isinstance(value, list) or len(value) != 2 or type(value[0]) is not int or value[0] < 0
                or not isinstance(value[1], str) or len(value[1]) != 2 * HASH_SIZE or set(value[1]) - _HEX):
            raise LogFailure(f"position {position} ({NODE_HEADS_ACTION}) records node {node}'s head as {value!r}, "
                             "not [size, root hex]")
        found.append(Head(position, node, value[0], bytes.fromhex(value[1])))
    return found


def _check_root(spec: LogSpec, at_size: list[SignedCheckpoint], root: bytes, covered: int) -> None:
    for signed in at_size:
        if signed.checkpoint.root != root:
            size = signed.checkpoint.size
            if size == 0:
                raise LogFailure(f"{signed.name()} does not have the root of the empty log")
            which = spec.entry(covered) if size - covered == 1 else f"one of {spec.span(covered, size)}"
            raise LogFailure(f"{signed.name()} does not match the entries: {which} was edited, removed, "
                             "inserted or moved since it was signed")


def walk(spec: LogSpec, leaves: Iterator[bytes], checkpoints: Sequence[SignedCheckpoint], wanted: Sequence[int],
         result: Walk) -> None:
    """Stream the leaves; check each checkpoint's root as soon as its size is reached; keep the roots at ``wanted``.

    ``result`` holds how many entries were read, also when a failure stopped the walk.
    """
    by_size: dict[int, list[SignedCheckpoint]] = {}
    for signed in checkpoints:
        by_size.setdefault(signed.checkpoint.size, []).append(signed)
    targets = sorted(set(by_size) | set(wanted))
    frontier, covered, t = Frontier(), 0, 0
    if targets and targets[0] == 0:
        _check_root(spec, by_size.get(0, []), EMPTY_ROOT, 0)
        result.roots[0], t = EMPTY_ROOT, 1
    try:
        for leaf in leaves:
            frontier.append(leaf)
            if t < len(targets) and frontier.size == targets[t]:
                root = result.roots[frontier.size] = frontier.root()
                _check_root(spec, by_size.get(frontier.size, []), root, covered)
                covered = frontier.size if frontier.size in by_size else covered
                t += 1
    finally:
        result.entries = frontier.size
    cut = [s for s in checkpoints if s.checkpoint.size > frontier.size]
    if cut:
        size = cut[0].checkpoint.size
        verb = "is" if size - frontier.size == 1 else "are"
        raise LogFailure(f"{cut[0].name()} covers {size} entries but the bundle holds only {frontier.size}: "
                         f"{spec.span(frontier.size, size)} {verb} missing (the tail was cut)")


def _decode(hashes: Any, where: str) -> list[bytes]:
    if not isinstance(hashes, list) or len(hashes) > MAX_PROOF_HASHES:
        raise LogFailure(f"{where} is not a list of at most {MAX_PROOF_HASHES} hashes")
    try:
        decoded = [base64.b64decode(h, validate=True) if isinstance(h, str) else b"" for h in hashes]
    except binascii.Error:
        raise LogFailure(f"{where} holds a hash that is not base64") from None
    if any(len(h) != HASH_SIZE for h in decoded):
        raise LogFailure(f"{where} holds a hash that is not {HASH_SIZE} bytes of base64")
    return decoded


def check_proofs(spec: LogSpec, checkpoints: Sequence[SignedCheckpoint], proofs: Any) -> None:
    """Every consistency proof verifies between two signed roots, and each step between checkpoints has one."""
    if not isinstance(proofs, list):
        raise LogFailure("its proofs in proofs.json are not a list")
    roots = {s.checkpoint.size: s.checkpoint.root for s in checkpoints}
    given: set[tuple[int, int]] = set()
    for number, item in enumerate(proofs, 1):
        old, new = (item.get("old"), item.get("new")) if isinstance(item, dict) else (None, None)
        if type(old) is not int or type(new) is not int:
            raise LogFailure(f"consistency proof {number} is not an {{\"old\", \"new\", \"proof\"}} object")
        where = f"the consistency proof from size {old} to size {new}"
        hashes = _decode(item.get("proof"), where)
        for size in (old, new):
            if size not in roots:
                raise LogFailure(f"{where} is between sizes of no checkpoint: there is none of size {size}")
        if not verify_consistency(old, new, roots[old], roots[new], hashes):
            raise LogFailure(f"{where} does not verify: the checkpoints of size {old} and {new} are not one history")
        given.add((old, new))
    sizes = sorted(roots)
    for old, new in zip(sizes, sizes[1:], strict=False):
        if old > 0 and (old, new) not in given:
            raise LogFailure(f"proofs.json holds no consistency proof from size {old} to size {new}")


def check_heads(spec: LogSpec, heads: Sequence[Head], walked: Walk) -> None:
    """Each head the control plane's log recorded of this node's log matches the root of its entries at that size."""
    for head in heads:
        where = f"control plane position {head.position} ({NODE_HEADS_ACTION}) records this log at size {head.size}"
        if head.size > walked.entries:
            raise LogFailure(f"{where}, but the bundle holds only {walked.entries} of its entries")
        if walked.roots[head.size] != head.root:
            raise LogFailure(f"{where} with root {head.root.hex()}, but its entries give "
                             f"{walked.roots[head.size].hex()}: the node's log is not the one the control plane "
                             "recorded")


def heads_by_node(heads: Sequence[Head]) -> Mapping[str, list[Head]]:
    found: dict[str, list[Head]] = {}
    for head in heads:
        found.setdefault(head.node, []).append(head)
    return found

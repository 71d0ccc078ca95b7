"""An inclusion proof of one audit entry: that it is leaf ``index`` of a log whose signed checkpoint is given.

The file an auditor downloads from an entry's page is JSON::

    {"format": "edgewise-inclusion-proof", "version": 1,
     "origin": <the log's origin>, "vkey": <C2SP vkey of the checkpoint's signer (name = origin)>,
     "cosigner_vkey": <optional: the control plane's vkey, which cosigns a node's checkpoints>,
     "index": <leaf index, from 0>,
     "leaf_data": <the control plane event's leaf data>  or  "entry": <the node's LogEntry object>,
     "proof": [<base64 hashes>], "checkpoint": <the signed note>}

It verifies with :func:`verify_inclusion_file` and nothing else: the
checkpoint's signature (and the cosignature, when a cosigner is named), then
:func:`edge_runtime.merkle.verify_inclusion` of the entry's leaf hash in the
checkpoint's root. The key to trust is the control plane's: a node entry's
proof is trusted through the control plane's cosignature of its checkpoint.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_runtime.audit_bundle_logs import BundleError, LogFailure
from edge_runtime.merkle import HASH_SIZE, leaf_hash, verify_inclusion
from edge_runtime.notes import MAX_NOTE_BYTES, NoteError, open_checkpoint, parse_vkey, verify_cosignature, vkey
from edge_runtime.protocol.audit import MAX_PROOF_HASHES, LogEntry

INCLUSION_FORMAT = "edgewise-inclusion-proof"
INCLUSION_VERSION = 1
MAX_INCLUSION_BYTES = 1 << 20
ANOTHER_KEY = "signed by another key than the one you trust"


class InclusionDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["edgewise-inclusion-proof"]
    version: int
    origin: str = Field(min_length=1, max_length=200)
    vkey: str = Field(max_length=400)
    cosigner_vkey: str | None = Field(default=None, max_length=400)
    index: int = Field(ge=0)
    leaf_data: str | None = None
    entry: LogEntry | None = None
    proof: list[str] = Field(max_length=MAX_PROOF_HASHES)
    checkpoint: str = Field(min_length=1, max_length=MAX_NOTE_BYTES)


@dataclass
class InclusionReport:
    """What an inclusion proof showed: ``error`` is None when the entry is in the signed log."""

    origin: str = ""
    index: int = 0
    size: int = 0
    # The entry's action, for display (a node entry's, or the control plane event's when its leaf data is JSON).
    action: str | None = None
    signer_vkey: str = ""
    cosigner_vkey: str | None = None
    cosigned_at: int | None = None
    # True when no key to trust was given: the file's own keys were used.
    key_from_file: bool = True
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def inclusion_proof_document(*, origin: str, vkey: str, index: int, proof: Sequence[bytes], checkpoint: str,
                             leaf_data: str | None = None, entry: LogEntry | None = None,
                             cosigner_vkey: str | None = None) -> dict[str, Any]:
    """The JSON document of one entry's inclusion proof (a control plane event's ``leaf_data`` or a node ``entry``)."""
    if (leaf_data is None) == (entry is None):
        raise ValueError("an inclusion proof is of a control plane event's leaf_data or of a node's entry")
    document: dict[str, Any] = {"format": INCLUSION_FORMAT, "version": INCLUSION_VERSION, "origin": origin,
                                "vkey": vkey, "index": index, "proof": [base64.b64encode(h).decode() for h in proof],
                                "checkpoint": checkpoint}
    if cosigner_vkey is not None:
        document["cosigner_vkey"] = cosigner_vkey
    if leaf_data is not None:
        document["leaf_data"] = leaf_data
    if entry is not None:
        document["entry"] = entry.model_dump(mode="json")
    return document


def trusted_key(text: str) -> str:
    """The trusted vkey in its normal form; BundleError (a usage error) if it is none."""
    try:
        name, key = parse_vkey(text)
    except NoteError as exc:
        raise BundleError(f"the key to trust is not a verifier key: {exc}") from None
    return vkey(name, key)


def read_inclusion_file(path: Path) -> dict[str, Any]:
    """The JSON object of an inclusion proof file; BundleError if it is not one."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_INCLUSION_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_INCLUSION_BYTES:
        raise BundleError(f"{path} is larger than an inclusion proof can be ({MAX_INCLUSION_BYTES} bytes)")
    try:
        document = json.loads(raw)
    except ValueError:
        raise BundleError(f"{path} is neither an audit bundle (a zip file) nor an inclusion proof (JSON)") from None
    if not isinstance(document, dict) or document.get("format") != INCLUSION_FORMAT:
        raise BundleError(f"{path} is JSON but not an inclusion proof (its format is not {INCLUSION_FORMAT!r})")
    return document


def verify_inclusion_file(path: str | Path, trusted_vkey: str | None = None) -> InclusionReport:
    """Check an inclusion proof file; BundleError if the file is none, else a report (``ok`` or the reason)."""
    return verify_inclusion_document(read_inclusion_file(Path(path)), trusted_vkey=trusted_vkey)


def verify_inclusion_document(document: dict[str, Any], *, trusted_vkey: str | None = None) -> InclusionReport:
    trusted = trusted_key(trusted_vkey) if trusted_vkey is not None else None
    report = InclusionReport(key_from_file=trusted is None)
    try:
        _verify(document, trusted, report)
    except LogFailure as exc:
        report.error = str(exc)
    return report


def _parse(document: dict[str, Any]) -> InclusionDocument:
    if document.get("version") != INCLUSION_VERSION:
        raise LogFailure(f"version {document.get('version')!r} of the inclusion proof format is not known here "
                         f"(this verifier reads version {INCLUSION_VERSION})")
    try:
        parsed = InclusionDocument.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise LogFailure(f"the inclusion proof is malformed: {'.'.join(map(str, first['loc']))}: {first['msg']}") \
            from None
    if (parsed.leaf_data is None) == (parsed.entry is None):
        raise LogFailure("the inclusion proof holds neither or both of leaf_data and entry")
    return parsed


def _key(text: str, what: str) -> tuple[str, Ed25519PublicKey]:
    try:
        return parse_vkey(text)
    except NoteError as exc:
        raise LogFailure(f"the {what} is not a verifier key: {exc}") from None


def _verify(document: dict[str, Any], trusted: str | None, report: InclusionReport) -> None:
    doc = _parse(document)
    report.origin, report.index = doc.origin, doc.index
    signer = _key(doc.vkey, "signer's key (vkey)")
    cosigner = _key(doc.cosigner_vkey, "cosigner's key (cosigner_vkey)") if doc.cosigner_vkey else None
    report.signer_vkey = vkey(*signer)
    report.cosigner_vkey = vkey(*cosigner) if cosigner else None
    if signer[0] != doc.origin:
        raise LogFailure(f"the signer's key is named {signer[0]!r}, not after the log's origin {doc.origin!r}")
    if trusted is not None and trusted not in (report.signer_vkey, report.cosigner_vkey):
        raise LogFailure(f"the inclusion proof is {ANOTHER_KEY}")
    try:
        note, checkpoint = open_checkpoint(doc.checkpoint, *signer)
        if cosigner is not None:
            report.cosigned_at = verify_cosignature(note, *cosigner)
    except ValueError as exc:  # a NoteError, or base64 that does not decode
        raise LogFailure(f"the checkpoint: {exc}") from None
    if checkpoint.origin != doc.origin:
        raise LogFailure(f"the checkpoint is of another log: {checkpoint.origin!r}, not {doc.origin!r}")
    report.size = checkpoint.size
    leaf = _leaf(doc, report)
    try:
        proof = [base64.b64decode(h, validate=True) for h in doc.proof]
    except ValueError:
        raise LogFailure("the proof holds a hash that is not base64") from None
    if any(len(h) != HASH_SIZE for h in proof) or not verify_inclusion(doc.index, checkpoint.size, leaf, proof,
                                                                       checkpoint.root):
        raise LogFailure(f"the proof does not show this entry as leaf {doc.index} of the log of size "
                         f"{checkpoint.size} that the checkpoint signs: it is not the entry the log holds there")


def _leaf(doc: InclusionDocument, report: InclusionReport) -> bytes:
    if doc.entry is not None:
        report.action = doc.entry.action
        if doc.entry.seq != doc.index + 1:
            raise LogFailure(f"the entry is #{doc.entry.seq}, but the proof is for leaf {doc.index} "
                             f"(entry #{doc.index + 1})")
        return doc.entry.leaf_hash()
    if doc.leaf_data is None:
        raise LogFailure("the inclusion proof holds neither leaf_data nor entry")
    try:
        event = json.loads(doc.leaf_data)
        report.action = str(event["action"]) if isinstance(event, dict) and "action" in event else None
    except ValueError:
        report.action = None
    return leaf_hash(doc.leaf_data.encode())

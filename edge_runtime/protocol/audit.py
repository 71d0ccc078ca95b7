"""How a node's audit log reaches the control plane: entries in batches, a signed checkpoint, consistency proofs
(in a :class:`~edge_runtime.protocol.SyncRequest`), and the control plane's cosigned answer (in the
:class:`~edge_runtime.protocol.SyncResponse`).

A node's log is an RFC 9162 Merkle log (:mod:`edge_runtime.merkle`). On every
sync the node signs a checkpoint of its whole log with its identity key and
sends the entries from ``start`` (where the control plane said it stands) on,
up to a batch. Two consistency proofs come with them: from the last checkpoint
the control plane cosigned to the new one (nothing it witnessed was changed),
and from the end of this batch to the new one (the entries sent are the new
tree's). The control plane checks both, stores the entries, idempotent by
index, and cosigns the checkpoint. A log that shrank or forked is flagged,
never accepted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from edge_runtime.canonical import canonical_json
from edge_runtime.merkle import leaf_hash
from edge_runtime.protocol.base import INT64_MAX, NO_NUL, Received, WireModel

# A batch holds at most this many entries, and what the node sends fits MAX_AGENT_BODY_BYTES.
AUDIT_BATCH_MAX = 1000
AUDIT_BATCH_BYTES = 192 * 1024
# One entry's detail (canonical JSON) is at most this long; the node refuses to log a larger one.
MAX_ENTRY_DETAIL = 16 * 1024
# A consistency proof of a log of up to 2**64 entries has at most 65 hashes.
MAX_PROOF_HASHES = 65

Hash64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ProofHash = Annotated[str, Field(min_length=44, max_length=44)]


def entry_leaf_data(*, seq: int, at: str, action: str, detail: str, prev_hash: str) -> bytes:
    """The bytes one log entry's Merkle leaf covers (``seq`` counts from 1; the leaf index is ``seq - 1``)."""
    return canonical_json({"seq": seq, "at": at, "action": action, "detail": detail, "prev_hash": prev_hash}).encode()


def entry_chain_hash(leaf_data: bytes) -> str:
    """The entry's hash in the node's local hash chain (sha256 of its leaf data, hex)."""
    return hashlib.sha256(leaf_data).hexdigest()


class LogEntry(WireModel):
    """One entry of a node's audit log: exactly what its leaf hash covers."""

    seq: int = Field(ge=1, le=INT64_MAX)
    at: str = Field(min_length=1, max_length=40, pattern=NO_NUL)
    action: str = Field(min_length=1, max_length=80, pattern=NO_NUL)
    # The detail as the node stored it: canonical JSON text.
    detail: str = Field(max_length=MAX_ENTRY_DETAIL, pattern=NO_NUL)
    prev_hash: Hash64

    def leaf_data(self) -> bytes:
        return entry_leaf_data(seq=self.seq, at=self.at, action=self.action, detail=self.detail,
                               prev_hash=self.prev_hash)

    def leaf_hash(self) -> bytes:
        return leaf_hash(self.leaf_data())


def decode_proof(hashes: list[str]) -> list[bytes]:
    """A proof's base64 hashes as bytes (the model validated their form)."""
    return [base64.b64decode(h) for h in hashes]


def encode_proof(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


class AuditUpload(WireModel):
    """A node's log on one sync: its signed checkpoint, a batch of entries and two consistency proofs."""

    # The node's checkpoint (C2SP signed note) of its whole log, signed with its identity key.
    checkpoint: str = Field(min_length=1, max_length=4096, pattern=NO_NUL)
    # The size of the last checkpoint of this log the control plane cosigned, as its last AuditAck said (0: none).
    cosigned_size: int = Field(default=0, ge=0, le=INT64_MAX)
    # Consistency proof from ``cosigned_size`` to the checkpoint's size.
    proof_from_cosigned: list[ProofHash] = Field(default_factory=list, max_length=MAX_PROOF_HASHES)
    # Leaf index of ``entries[0]`` (its seq - 1); the entries are consecutive.
    start: int = Field(default=0, ge=0, le=INT64_MAX)
    entries: list[LogEntry] = Field(default_factory=list, max_length=AUDIT_BATCH_MAX)
    # Consistency proof from ``start + len(entries)`` to the checkpoint's size.
    proof_from_batch: list[ProofHash] = Field(default_factory=list, max_length=MAX_PROOF_HASHES)

    @field_validator("proof_from_cosigned", "proof_from_batch")
    @classmethod
    def _hashes(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                if len(base64.b64decode(item, validate=True)) != 32:
                    raise ValueError("a proof hash is 32 bytes")
            except binascii.Error:
                raise ValueError("a proof hash is base64") from None
        return value

    @field_validator("entries")
    @classmethod
    def _consecutive(cls, value: list[LogEntry]) -> list[LogEntry]:
        for before, after in zip(value, value[1:], strict=False):
            if after.seq != before.seq + 1:
                raise ValueError(f"entries are consecutive: #{after.seq} follows #{before.seq}")
        return value

    @model_validator(mode="after")
    def _starts_at_start(self) -> AuditUpload:
        if self.entries and self.entries[0].seq != self.start + 1:
            raise ValueError(f"entries start at leaf {self.start} (seq {self.start + 1}), "
                             f"not seq {self.entries[0].seq}")
        return self

    @property
    def end(self) -> int:
        """The leaf index after the last entry sent."""
        return self.start + len(self.entries)


# ok: stored and cosigned; refused: this upload was not taken (its message says why; nothing changed);
# forked: the log shrank or its history changed after a cosigned checkpoint (flagged; nothing more is taken);
# no_identity_key / identity_key_mismatch: the control plane has no key, or another key, registered for the node.
AuditState = Literal["ok", "refused", "forked", "no_identity_key", "identity_key_mismatch"]


class AuditAck(Received):
    """The control plane's answer to an upload."""

    state: AuditState = "ok"
    # Entries of this node's log the control plane holds: the next upload starts there.
    stored: int = 0
    # The size of the last checkpoint of this log the control plane cosigned: the next upload's
    # ``proof_from_cosigned`` starts there (a control plane restored from a backup may know an older one).
    cosigned_size: int = 0
    # The node's checkpoint with the control plane's cosignature added, when it cosigned it.
    cosigned: str = ""
    message: str = ""

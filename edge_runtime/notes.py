"""Checkpoints of Merkle logs as signed notes, in the C2SP formats.

* A **checkpoint** (C2SP tlog-checkpoint) names a log's state: its origin
  line, its size and its root hash (base64), one per line.
* A **signed note** (C2SP signed-note) is that text, a blank line and one
  signature line per signer: ``— <name> <base64(key id || signature)>``.
  An Ed25519 key id is the first 4 bytes of ``SHA-256(name || "\\n" || 0x01 ||
  public key)``; the signature covers the text.
* A **cosignature** (C2SP tlog-cosignature/v1) is a witness's statement that
  it saw this checkpoint and that it is consistent with every earlier one it
  saw: algorithm byte 0x04, signed over ``"cosignature/v1\\ntime <T>\\n"`` and
  the checkpoint text, with the time ``T`` (seconds since the epoch) in the
  signature line before the signature.

A node signs its log's checkpoint with its identity key; the control plane,
as the node's witness, adds its cosignature. The control plane signs the
checkpoints of its own log with its log key. Anyone holding the public keys
(``vkey`` strings) checks them with nothing but this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.merkle import HASH_SIZE
from edge_runtime.signing import public_key_raw

ED25519 = 0x01
COSIGNATURE_V1 = 0x04
MAX_NOTE_BYTES = 1 << 16
_NAME = re.compile(r"^[^\s+]{1,200}$")
_SIGNATURE_LINE = re.compile(r"^\u2014 (\S+) ([A-Za-z0-9+/=]+)$")


class NoteError(ValueError):
    """A note, checkpoint or signature that is malformed or does not verify; the message says which."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def body(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"

    @classmethod
    def parse(cls, body: str) -> Checkpoint:
        lines = body.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise NoteError("a checkpoint is an origin, a size and a root hash, one per line")
        origin, size_text, root_text = lines[0], lines[1], lines[2]
        if not origin or origin != origin.strip():
            raise NoteError("the checkpoint's origin line is empty or padded")
        if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
            raise NoteError(f"the checkpoint's size {size_text!r} is not a decimal number")
        try:
            root = base64.b64decode(root_text, validate=True)
        except binascii.Error:
            raise NoteError("the checkpoint's root hash is not base64") from None
        if len(root) != HASH_SIZE:
            raise NoteError(f"the checkpoint's root hash is {len(root)} bytes, not {HASH_SIZE}")
        return cls(origin=origin, size=int(size_text), root=root)


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: bytes
    blob: bytes  # after the key id: the signature (with a cosignature's timestamp before it)

    def line(self) -> str:
        return f"\u2014 {self.name} {base64.b64encode(self.key_id + self.blob).decode()}\n"


@dataclass(frozen=True)
class Note:
    text: str
    signatures: tuple[Signature, ...]

    def render(self) -> str:
        return self.text + "\n" + "".join(s.line() for s in self.signatures)


def key_id(name: str, public_key: Ed25519PublicKey, algorithm: int = ED25519) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([algorithm]) + public_key_raw(public_key)).digest()[:4]


def vkey(name: str, public_key: Ed25519PublicKey) -> str:
    """The verifier key string: ``<name>+<hex key id>+<base64(0x01 || public key)>``."""
    raw = bytes([ED25519]) + public_key_raw(public_key)
    return f"{name}+{key_id(name, public_key).hex()}+{base64.b64encode(raw).decode()}"


def parse_vkey(text: str) -> tuple[str, Ed25519PublicKey]:
    parts = text.strip().split("+", 2)
    if len(parts) != 3 or not _NAME.match(parts[0]):
        raise NoteError("a verifier key is <name>+<key id>+<key>")
    try:
        raw = base64.b64decode(parts[2], validate=True)
    except binascii.Error:
        raise NoteError("the verifier key is not base64") from None
    if len(raw) != 33 or raw[0] != ED25519:
        raise NoteError("the verifier key is not an Ed25519 key")
    key = Ed25519PublicKey.from_public_bytes(raw[1:])
    if key_id(parts[0], key).hex() != parts[1].lower():
        raise NoteError("the verifier key's id does not match its name and key")
    return parts[0], key


def parse_note(note: str) -> Note:
    if len(note.encode()) > MAX_NOTE_BYTES:
        raise NoteError(f"a note is at most {MAX_NOTE_BYTES} bytes")
    text, sep, rest = note.rpartition("\n\n")
    if not sep or not rest.endswith("\n"):
        raise NoteError("a signed note is its text, a blank line and signature lines, each ending in a newline")
    signatures: list[Signature] = []
    for line in rest[:-1].split("\n"):
        match = _SIGNATURE_LINE.match(line)
        if not match:
            raise NoteError(f"not a signature line: {line[:80]!r}")
        blob = base64.b64decode(match.group(2))
        if len(blob) < 5:
            raise NoteError("a signature line is too short to hold a key id and a signature")
        signatures.append(Signature(match.group(1), blob[:4], blob[4:]))
    return Note(text + "\n", tuple(signatures))


def sign_note(text: str, name: str, key: Ed25519PrivateKey) -> str:
    """``text`` (ending in a newline) signed by ``name``: a signed note with one signature."""
    if not text.endswith("\n") or "\n\n" in text:
        raise NoteError("a note's text ends in one newline and holds no blank line")
    if not _NAME.match(name):
        raise NoteError(f"a key name has no spaces or '+': {name!r}")
    signature = Signature(name, key_id(name, key.public_key()), key.sign(text.encode()))
    return Note(text, (signature,)).render()


def cosignature_message(text: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode()


def add_cosignature(note: str, name: str, key: Ed25519PrivateKey, timestamp: int) -> str:
    """``note`` with a witness's cosignature at ``timestamp`` added (the witness checked it first)."""
    parsed = parse_note(note)
    signed = key.sign(cosignature_message(parsed.text, timestamp))
    cosig = Signature(name, key_id(name, key.public_key(), COSIGNATURE_V1), struct.pack(">Q", timestamp) + signed)
    return Note(parsed.text, (*parsed.signatures, cosig)).render()


def verify_signature(note: Note, name: str, public_key: Ed25519PublicKey) -> None:
    """Raise NoteError unless ``note`` carries a valid signature by ``name`` with ``public_key``."""
    wanted = key_id(name, public_key)
    for signature in note.signatures:
        if signature.name == name and signature.key_id == wanted:
            try:
                public_key.verify(signature.blob, note.text.encode())
                return
            except InvalidSignature:
                raise NoteError(f"the signature of {name} does not verify") from None
    raise NoteError(f"the note carries no signature of {name} with that key")


def verify_cosignature(note: Note, name: str, public_key: Ed25519PublicKey) -> int:
    """The timestamp of ``name``'s valid cosignature on ``note``; NoteError if there is none."""
    wanted = key_id(name, public_key, COSIGNATURE_V1)
    for signature in note.signatures:
        if signature.name == name and signature.key_id == wanted:
            if len(signature.blob) != 8 + 64:
                raise NoteError(f"the cosignature of {name} is not a timestamp and an Ed25519 signature")
            (timestamp,) = struct.unpack(">Q", signature.blob[:8])
            try:
                public_key.verify(signature.blob[8:], cosignature_message(note.text, timestamp))
            except InvalidSignature:
                raise NoteError(f"the cosignature of {name} does not verify") from None
            return int(timestamp)
    raise NoteError(f"the note carries no cosignature of {name} with that key")


def open_checkpoint(note_text: str, name: str, public_key: Ed25519PublicKey) -> tuple[Note, Checkpoint]:
    """Parse a signed checkpoint and check ``name``'s signature on it; NoteError otherwise."""
    note = parse_note(note_text)
    verify_signature(note, name, public_key)
    return note, Checkpoint.parse(note.text)

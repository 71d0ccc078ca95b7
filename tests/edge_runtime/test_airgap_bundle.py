"""The bundle file format: what is written reads back, and each kind of damage is refused by name."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import random
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from edge_runtime import signing
from edge_runtime.airgap.bundle import (
    BundleRefused,
    Member,
    SignedMeta,
    bundle_parts,
    check_fresh,
    read_bundle,
    read_metadata,
    verify_signature,
)
from edge_runtime.airgap.writing import Source, write_bundle

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
KEY = signing.generate_private_key()
OTHER = signing.generate_private_key()
MODEL = random.Random(7).randbytes(1 << 20)


def meta(**changes: Any) -> dict[str, Any]:
    return {"direction": "in", "site": "base-7", "site_id": "4b1d", "sequence": 3, "created": T0,
            "expires": T0 + dt.timedelta(days=30), **changes}


def sources(tmp_path: Path) -> list[Source]:
    model = tmp_path / "model.onnx"
    model.write_bytes(MODEL)
    return [Source.json("nodes/n1.json", {"generation": 4}),
            Source(name="artifacts/model", path=model, sha256=hashlib.sha256(MODEL).hexdigest(), size=len(MODEL))]


class Staged:
    """A sink that keeps each member's bytes, and whether any member was read at all."""

    def __init__(self) -> None:
        self.files: dict[str, io.BytesIO] = {}

    def __call__(self, member: Member) -> BinaryIO:
        buffer = _Kept()
        self.files[member.name] = buffer
        return buffer

    def data(self, name: str) -> bytes:
        return self.files[name].getvalue()


class _Kept(io.BytesIO):
    def close(self) -> None:  # keep the bytes readable after the reader closed the sink
        pass


def verify_with(key: Any) -> Any:
    def check(signed: SignedMeta) -> None:
        verify_signature(signed, key.public_key())
    return check


def written(tmp_path: Path, **options: Any) -> Path:
    out = tmp_path / "b.ewb"
    write_bundle(out, meta(), sources(tmp_path), KEY, **options)
    return out


def test_a_written_bundle_reads_back_with_every_member_intact(tmp_path: Path) -> None:
    out = written(tmp_path)
    staged = Staged()
    signed = read_bundle(out, verify_with(KEY), staged)
    assert signed.signed.sequence == 3 and signed.signed.site == "base-7"
    assert [m.name for m in signed.signed.members] == ["nodes/n1.json", "artifacts/model"]
    assert json.loads(staged.data("nodes/n1.json")) == {"generation": 4}
    assert staged.data("artifacts/model") == MODEL
    # Plain tar: any tar tool lists it.
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["bundle.json", "nodes/n1.json", "artifacts/model"]


def test_parts_of_a_given_size_read_back_as_one_bundle(tmp_path: Path) -> None:
    out = written(tmp_path, part_size=300 * 1024)
    parts = bundle_parts(out)
    assert [p.name for p in parts] == [f"b.ewb.{i:03d}" for i in range(1, len(parts) + 1)] and len(parts) == 4
    assert all(p.stat().st_size == 300 * 1024 for p in parts[:-1])
    staged = Staged()
    read_bundle(parts[0], verify_with(KEY), staged)
    assert staged.data("artifacts/model") == MODEL


def test_a_missing_last_part_is_refused_as_truncated(tmp_path: Path) -> None:
    out = written(tmp_path, part_size=300 * 1024)
    bundle_parts(out)[-1].unlink()
    with pytest.raises(BundleRefused, match="truncated"):
        read_bundle(out, verify_with(KEY), Staged())


def test_a_missing_middle_part_is_refused(tmp_path: Path) -> None:
    out = written(tmp_path, part_size=300 * 1024)
    parts = bundle_parts(out)
    parts[2].unlink()
    # Parts are read in order up to the first gap: what follows the gap is never read, so the bundle ends early.
    with pytest.raises(BundleRefused, match="truncated"):
        read_bundle(out, verify_with(KEY), Staged())


def test_swapped_parts_are_refused(tmp_path: Path) -> None:
    out = written(tmp_path, part_size=300 * 1024)
    parts = bundle_parts(out)
    a, b = parts[1].read_bytes(), parts[2].read_bytes()
    parts[1].write_bytes(b)
    parts[2].write_bytes(a)
    with pytest.raises(BundleRefused, match="altered"):
        read_bundle(out, verify_with(KEY), Staged())


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_member_names_the_member(tmp_path: Path) -> None:
    out = written(tmp_path)
    flip(out, out.stat().st_size - 4096)
    with pytest.raises(BundleRefused, match="member artifacts/model was altered"):
        read_bundle(out, verify_with(KEY), Staged())


def test_a_flipped_byte_in_the_metadata_fails_its_signature(tmp_path: Path) -> None:
    out = written(tmp_path)
    raw = out.read_bytes()
    at = raw.index(b'"sequence": 3')
    data = bytearray(raw)
    data[at + len('"sequence": ')] = ord("4")
    out.write_bytes(bytes(data))
    with pytest.raises(BundleRefused, match="does not verify"):
        read_bundle(out, verify_with(KEY), Staged())


def test_a_flipped_byte_in_a_header_is_refused_as_damaged(tmp_path: Path) -> None:
    out = written(tmp_path)
    raw = out.read_bytes()
    flip(out, raw.rindex(b"nodes/n1.json") + 3)  # its tar header, after the metadata
    with pytest.raises(BundleRefused, match="damaged: the header of member nodes/n1.json"):
        read_bundle(out, verify_with(KEY), Staged())


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    out = written(tmp_path)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleRefused, match="truncated"):
        read_bundle(out, verify_with(KEY), Staged())


def test_another_key_is_refused_before_any_member_is_read(tmp_path: Path) -> None:
    out = written(tmp_path)
    staged = Staged()
    with pytest.raises(BundleRefused, match="not by the expected key"):
        read_bundle(out, verify_with(OTHER), staged)
    assert staged.files == {}


def test_a_check_that_refuses_stops_before_any_member_is_read(tmp_path: Path) -> None:
    out = written(tmp_path)
    staged = Staged()

    def stale(signed: SignedMeta) -> None:
        raise BundleRefused("older")

    with pytest.raises(BundleRefused, match="older"):
        read_bundle(out, stale, staged)
    assert staged.files == {}


def retar(src: Path, dst: Path, edit: Any) -> None:
    """Copy the tar at ``src`` to ``dst`` member by member, through ``edit(members) -> members``."""
    with tarfile.open(src) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as out:
        for info, data in edit(members):
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def test_an_extra_member_is_refused(tmp_path: Path) -> None:
    out = written(tmp_path)
    extra = tarfile.TarInfo("evil.onnx")
    retar(out, tmp_path / "x.ewb", lambda ms: [*ms, (extra, b"payload")])
    with pytest.raises(BundleRefused, match="member evil.onnx is not listed"):
        read_bundle(tmp_path / "x.ewb", verify_with(KEY), Staged())


def test_a_dropped_member_is_refused(tmp_path: Path) -> None:
    out = written(tmp_path)
    retar(out, tmp_path / "x.ewb", lambda ms: ms[:-1])
    with pytest.raises(BundleRefused, match="ends before member artifacts/model"):
        read_bundle(tmp_path / "x.ewb", verify_with(KEY), Staged())


def test_reordered_members_are_refused(tmp_path: Path) -> None:
    out = written(tmp_path)
    retar(out, tmp_path / "x.ewb", lambda ms: [ms[0], ms[2], ms[1]])
    with pytest.raises(BundleRefused, match="out of order"):
        read_bundle(tmp_path / "x.ewb", verify_with(KEY), Staged())


def test_a_member_swapped_for_another_of_the_same_size_is_refused(tmp_path: Path) -> None:
    out = written(tmp_path)
    retar(out, tmp_path / "x.ewb",
          lambda ms: [*ms[:2], (ms[2][0], bytes(reversed(ms[2][1])))])
    with pytest.raises(BundleRefused, match="member artifacts/model was altered"):
        read_bundle(tmp_path / "x.ewb", verify_with(KEY), Staged())


def test_a_file_that_is_no_bundle_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.ewb"
    junk.write_bytes(b"PK\x03\x04 not a tar at all" * 40)
    with pytest.raises(BundleRefused, match="not a bundle"):
        read_bundle(junk, verify_with(KEY), Staged())
    with pytest.raises(BundleRefused, match="no such bundle"):
        read_bundle(tmp_path / "absent.ewb", verify_with(KEY), Staged())


def test_a_source_that_does_not_match_its_listed_digest_fails_the_write_and_leaves_nothing(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(MODEL)
    wrong = Source(name="artifacts/model", path=model, sha256="0" * 64, size=len(MODEL))
    with pytest.raises(ValueError, match="artifacts/model"):
        write_bundle(tmp_path / "b.ewb", meta(), [wrong], KEY, part_size=300 * 1024)
    assert list(tmp_path.glob("b.ewb*")) == []


def test_an_existing_bundle_is_never_overwritten(tmp_path: Path) -> None:
    out = written(tmp_path)
    before = out.read_bytes()
    with pytest.raises(FileExistsError):
        write_bundle(out, meta(), sources(tmp_path), KEY)
    assert out.read_bytes() == before


def test_expiry(tmp_path: Path) -> None:
    signed = read_metadata(written(tmp_path)).signed
    assert check_fresh(signed, now=T0 + dt.timedelta(days=29)) is None
    assert "expired at 2026-12-31T12:00:00+00:00" in (check_fresh(signed, now=T0 + dt.timedelta(days=31)) or "")

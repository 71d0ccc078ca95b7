"""One timed arm of the bundles benchmark, in a process of its own: ``python -m benchmarks.bundles.work SPEC``.

``SPEC`` is a JSON object; ``spec["arm"]`` is ``export`` or ``import``. The
process imports everything first, notes its RSS, resets its peak RSS
(``/proc/self/clear_refs``), does the work and prints one JSON line: the
seconds of the work alone (interpreter start and imports excluded), the RSS
before, the peak during (``VmHWM``) and the growth between the two, the
process's peak over its life (imports included), and what the arm returns.

* **export**: a fresh Ed25519 key, then :func:`write_bundle` of a bundle in
  (direction ``in``, a site, sequence 1, created and expires) holding three
  small JSON members (node entries) and the model as ``artifacts/<sha256>``.
  With ``sha256`` and ``size`` in the spec the model's member is listed with
  them and checked while it is copied (what ``sites.bundles.bundle_export``
  does); without, ``write_bundle`` hashes the file first.
* **import**: :func:`read_bundle` with a check that verifies the site and the
  signature, and a sink that writes every member into a staging directory
  (node entries by name, artifacts as ``<sha256>.onnx``, as the node's
  import does); then each artifact is fsynced and moved into the target
  directory with ``os.replace``, and the target directory fsynced, as the
  node's import commits (``edge_runtime.airgap.inbound._commit``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime import signing
from edge_runtime.airgap.bundle import BundleRefused, Member, SignedMeta, read_bundle, verify_signature
from edge_runtime.airgap.writing import Source, write_bundle

SITE = "bench-site"
SITE_ID = "5b0f3c8e-6f8a-4d2e-9a4b-3f1e2d7c9a10"
NODES = ("0d6c1f2a-1b3c-4d5e-8f90-a1b2c3d4e5f6", "4e2a9b7c-2c4d-4e6f-9a01-b2c3d4e5f6a7",
         "9f1e8d7c-3d5e-4f70-8b12-c3d4e5f6a7b8")
MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset this process's peak RSS to its RSS now; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _node_entry(node: str) -> dict[str, Any]:
    """A node's entry of a bundle in, of about the size of a real one (its signed desired state, a receipt)."""
    return {"node_id": node, "answer": {"desired": {"payload": json.dumps({"node_id": node, "generation": 7,
                                                                          "models": [], "policy": {}}),
                                                    "signature": "A" * 88, "key_id": "b" * 64},
                                        "queries": [], "sync_interval": 60},
            "receipt": None, "notes": "x" * 2048}


def _sources(spec: dict[str, Any]) -> list[Source]:
    model = Source(name=f"artifacts/{spec['model_sha256']}", path=Path(spec["model"]),
                   sha256=spec["model_sha256"] if spec["sha_given"] else None,
                   size=spec["model_size"] if spec["sha_given"] else None)
    return [*(Source.json(f"nodes/{node}.json", _node_entry(node)) for node in NODES), model]


def export(spec: dict[str, Any]) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    meta = {"direction": "in", "site": SITE, "site_id": SITE_ID, "sequence": 1, "created": now,
            "expires": now + dt.timedelta(days=30)}
    part_size = spec.get("part_size")
    signed, paths = write_bundle(Path(spec["out"]), meta, _sources(spec), key, part_size=part_size)
    public = base64.b64encode(signing.public_key_raw(key.public_key())).decode()
    return {"parts": len(paths), "bundle_bytes": sum(p.stat().st_size for p in paths),
            "members": len(signed.signed.members), "public_key": public}


class _Staging:
    """The sink of the import: every member into ``staging``; artifacts named by their sha256."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.artifacts: list[str] = []

    def __call__(self, member: Member) -> BinaryIO:
        if member.name.startswith("artifacts/"):
            self.artifacts.append(member.sha256)
            return (self.staging / f"{member.sha256}.onnx").open("xb")
        return (self.staging / member.name.replace("/", "_")).open("xb")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def import_(spec: dict[str, Any]) -> dict[str, Any]:
    staging, target = Path(spec["staging"]), Path(spec["target"])
    staging.mkdir(parents=True, mode=0o700)
    target.mkdir(parents=True, exist_ok=True)
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(spec["public_key"]))

    def check(signed: SignedMeta) -> None:
        if signed.signed.direction != "in" or signed.signed.site != SITE:
            raise BundleRefused(f"not a bundle in for site {SITE}")
        verify_signature(signed, key)

    sink = _Staging(staging)
    signed = read_bundle(Path(spec["bundle"]), check, sink)
    committed = []
    for sha256 in sink.artifacts:
        source = staging / f"{sha256}.onnx"
        with source.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(source, target / f"{sha256}.onnx")
        committed.append(str(target / f"{sha256}.onnx"))
    _fsync_dir(target)
    return {"members": len(signed.signed.members), "artifacts": committed}


ARMS = {"export": export, "import": import_}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    arm = ARMS[spec["arm"]]
    rss_before, peak_before = _status_kib("VmRSS"), _status_kib("VmHWM")
    reset = _reset_peak()
    started = time.perf_counter()
    result = arm(spec)
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    print(json.dumps({"s": seconds, "rss_before_mib": rss_before / 1024, "peak_during_mib": peak / 1024,
                      "peak_mib": max(peak, peak_before) / 1024,
                      "growth_mib": (peak - rss_before) / 1024, "peak_reset": reset, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

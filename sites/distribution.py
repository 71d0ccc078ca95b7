"""The control plane as a tiny package index for its sites (``/agent/v1/dist/``).

``GET dist/`` is a plain HTML page of links in the form pip understands for
``--find-links`` (PEP 503 anchors with a ``#sha256=`` fragment): the
``edge-runtime`` wheel built from this control plane's own code, plus every
``.whl`` in the wheelhouse folder (``settings.WHEELHOUSE_DIR``), which an
operator fills with the runtime's dependencies so that sites without a
package index install everything from here (``EDGEWISE_OFFLINE=1`` in the
installer).

``GET dist/<filename>`` serves one of the listed files and nothing else: the
name is looked up among the listed names, never joined onto a path, so no
request reaches a file the index does not list. Downloads are resumable: one
``Range: bytes=a-b`` (or ``a-`` or ``-n``) answers 206 with ``Content-Range``;
a range that is malformed, asks for several parts, or lies past the end
answers 416. ``If-Range`` with a stale ETag gets the whole file, so a resumed
download never splices two different files.

``GET signing-key?challenge=HEX`` lets an installer check, before it spends
its one-time token, that this control plane holds the signing key whose
fingerprint the installer carries: the answer has the public key and an
Ed25519 signature over ``KEY_PROOF_PREFIX + challenge``. The prefix and the
hex-only challenge make sure this signature can never pass for a signed
desired state (those sign a JSON document).

No authentication: a wheel is public code, a public key is public, and an
installer must fetch both before the node has a credential.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.utils.html import format_html, format_html_join
from django.views.decorators.http import require_safe

from edge_runtime import signing
from orchestrator import keys
from orchestrator.http import ranged_file_response
from sites import wheel

CONTENT_TYPE = "application/octet-stream"
# A wheel file name: distribution-version(-build)?-python-abi-platform.whl.
_WHEEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.whl$")
KEY_PROOF_PREFIX = signing.KEY_PROOF_PREFIX
_CHALLENGE = re.compile(r"^[0-9a-f]{32,128}$")


@dataclass(frozen=True)
class DistFile:
    filename: str
    sha256: str
    size: int
    # Exactly one of the two: the runtime wheel lives in memory, wheelhouse files on disk.
    data: bytes | None = None
    path: Path | None = None
    requires_python: str = ""


_hash_lock = threading.Lock()
# (path, size, mtime_ns) -> sha256: wheelhouse files are hashed once, not per request.
_hash_cache: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    key = (str(path), size, mtime_ns)
    with _hash_lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(256 * 1024), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _hash_lock:
        _hash_cache[key] = value
    return value


def wheelhouse_files(directory: Path | None = None) -> list[DistFile]:
    """The ``.whl`` files directly inside the wheelhouse folder, sorted by name."""
    directory = Path(directory or settings.WHEELHOUSE_DIR)
    if not directory.is_dir():
        return []
    found: list[DistFile] = []
    for path in sorted(directory.iterdir()):
        if not _WHEEL_NAME.match(path.name) or not path.is_file():
            continue
        stat = path.stat()
        found.append(DistFile(filename=path.name, sha256=_file_sha256(path, stat.st_size, stat.st_mtime_ns),
                              size=stat.st_size, path=path))
    return found


def dist_files() -> list[DistFile]:
    """Everything the index lists: the runtime wheel first, then the wheelhouse."""
    runtime = wheel.runtime_wheel()
    files = [DistFile(filename=runtime.filename, sha256=runtime.sha256, size=runtime.size, data=runtime.data,
                      requires_python=runtime.requires_python)]
    # A wheelhouse file named like the runtime wheel never shadows the code
    # this control plane actually runs.
    files += [f for f in wheelhouse_files() if f.filename != runtime.filename]
    return files


@require_safe
def dist_index(request: HttpRequest) -> HttpResponse:
    rows = format_html_join(
        "\n",
        '<a href="{}#sha256={}"{}>{}</a><br>',
        (
            (
                f.filename,
                f.sha256,
                format_html(' data-requires-python="{}"', f.requires_python) if f.requires_python else "",
                f.filename,
            )
            for f in dist_files()
        ),
    )
    page = format_html(
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="pypi:repository-version" content="1.0">\n'
        "<title>Edgewise edge runtime distribution</title>\n</head>\n<body>\n"
        "<h1>Edgewise edge runtime distribution</h1>\n{}\n</body>\n</html>\n",
        rows,
    )
    response = HttpResponse(page, content_type="text/html; charset=utf-8")
    # The list changes when the control plane is upgraded or the wheelhouse is filled.
    response["Cache-Control"] = "no-cache"
    return response


@require_safe
def dist_file(request: HttpRequest, filename: str) -> HttpResponseBase:
    item = next((f for f in dist_files() if f.filename == filename), None)
    if item is None:
        return HttpResponse(f"{filename!r} is not distributed here; see the index at ./\n", status=404,
                            content_type="text/plain; charset=utf-8")
    # The ETag is the content hash: a resumed download whose If-Range names
    # another version gets the whole new file.
    return ranged_file_response(request, _on_disk(item), content_type=CONTENT_TYPE, filename=item.filename,
                                etag=f'"{item.sha256}"')


def _on_disk(item: DistFile) -> Path:
    """The file to serve; the in-memory runtime wheel is written once per content hash."""
    if item.path is not None:
        return item.path
    assert item.data is not None
    path = Path(settings.DATA_DIR) / "dist-cache" / item.sha256 / item.filename
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        tmp.write_bytes(item.data)
        tmp.replace(path)
    return path


@require_safe
def signing_key(request: HttpRequest) -> JsonResponse:
    challenge = request.GET.get("challenge", "")
    if not _CHALLENGE.match(challenge):
        return JsonResponse({"error": "challenge must be 32 to 128 lowercase hex digits", "field": "challenge"},
                            status=400)
    key = keys.signing_key()
    proof = key.sign(signing.key_proof_message(challenge))
    response = JsonResponse({
        "public_key": keys.public_key_b64(),
        "fingerprint": signing.fingerprint(signing.public_key_raw(key.public_key())),
        "challenge": challenge,
        "signature": base64.b64encode(proof).decode(),
    })
    response["Cache-Control"] = "no-store"
    return response

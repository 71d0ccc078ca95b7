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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils.html import format_html, format_html_join
from django.views.decorators.http import require_safe

from edge_runtime import signing
from orchestrator import keys
from sites import wheel

CONTENT_TYPE = "application/octet-stream"
# A wheel file name: distribution-version(-build)?-python-abi-platform.whl.
_WHEEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.whl$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 256 * 1024
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


class RangeNotSatisfiable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
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
                      requires_python=wheel.REQUIRES_PYTHON)]
    # A wheelhouse file named like the runtime wheel never shadows the code
    # this control plane actually runs.
    files += [f for f in wheelhouse_files() if f.filename != runtime.filename]
    return files


def parse_range(header: str, size: int) -> tuple[int, int]:
    """``(first, last)`` byte positions, inclusive, of a single-range ``Range`` header."""
    value = header.replace(" ", "")
    if "," in value:
        raise RangeNotSatisfiable("only one byte range per request is supported")
    match = _RANGE.match(value)
    if match is None:
        raise RangeNotSatisfiable(f"malformed Range header {header!r} (expected bytes=FIRST-LAST)")
    first_s, last_s = match.groups()
    if size == 0:
        raise RangeNotSatisfiable("the file is empty; no byte range can be served")
    if not first_s:
        if not last_s or int(last_s) == 0:
            raise RangeNotSatisfiable(f"Range {header!r} asks for no bytes")
        return max(0, size - int(last_s)), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        raise RangeNotSatisfiable(f"Range {header!r} ends before it starts")
    if first >= size:
        raise RangeNotSatisfiable(f"Range {header!r} starts at or past the end of the {size}-byte file")
    return first, min(last, size - 1)


def _read_range(path: Path, first: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as fh:
        fh.seek(first)
        left = length
        while left > 0:
            chunk = fh.read(min(_CHUNK, left))
            if not chunk:
                # The file shrank under us; stop rather than send a short body silently padded.
                return
            left -= len(chunk)
            yield chunk


def _body(item: DistFile, first: int, last: int, head: bool) -> HttpResponse | StreamingHttpResponse:
    length = last - first + 1
    if head:
        return HttpResponse(b"")
    if item.data is not None:
        return HttpResponse(item.data[first : last + 1])
    assert item.path is not None
    if first == 0 and length == item.size:
        return FileResponse(item.path.open("rb"))
    return StreamingHttpResponse(_read_range(item.path, first, length))


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
def dist_file(request: HttpRequest, filename: str) -> HttpResponse | StreamingHttpResponse:
    item = next((f for f in dist_files() if f.filename == filename), None)
    if item is None:
        return HttpResponse(f"{filename!r} is not distributed here; see the index at ./\n", status=404,
                            content_type="text/plain; charset=utf-8")
    etag = f'"{item.sha256}"'
    head = request.method == "HEAD"
    header = request.headers.get("Range", "")
    if_range = request.headers.get("If-Range", "")
    status = 200
    first, last = 0, item.size - 1
    # A resumed download whose If-Range names another version gets the whole new file.
    if header and (not if_range or if_range == etag):
        try:
            first, last = parse_range(header, item.size)
        except RangeNotSatisfiable as exc:
            response = HttpResponse(exc.message + "\n", status=416, content_type="text/plain; charset=utf-8")
            response["Content-Range"] = f"bytes */{item.size}"
            response["Accept-Ranges"] = "bytes"
            return response
        status = 206
    response = _body(item, first, last, head)
    response.status_code = status
    response["Content-Type"] = CONTENT_TYPE
    response["Content-Length"] = str(last - first + 1)
    response["Accept-Ranges"] = "bytes"
    response["ETag"] = etag
    response["Content-Disposition"] = f'attachment; filename="{item.filename}"'
    if status == 206:
        response["Content-Range"] = f"bytes {first}-{last}/{item.size}"
    return response


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

"""Serving files with HTTP Range support, so interrupted downloads resume.

``ranged_file_response`` answers a GET or HEAD for a file on disk:

- no ``Range``: 200 with the whole file (streamed, never read into memory);
- one ``Range: bytes=a-b`` (or ``a-`` or ``-n``): 206 with ``Content-Range``;
- a range that is malformed, asks for several parts or starts past the end:
  416 with ``Content-Range: bytes */<size>``;
- ``If-Range`` naming another ETag: the whole new file (200), so a resumed
  download never splices two different files.

The ETag is the caller's (a content hash) or derived from size and mtime.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from django.http import FileResponse, HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.utils.http import content_disposition_header

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 256 * 1024


class RangeNotSatisfiable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                # The file shrank under us: stop rather than pad a short body.
                return
            left -= len(chunk)
            yield chunk


def ranged_file_response(request: HttpRequest, path: Path, *, content_type: str, filename: str | None = None,
                         etag: str | None = None) -> HttpResponseBase:
    stat = os.stat(path)
    size = stat.st_size
    etag = etag or f'"{size:x}-{stat.st_mtime_ns:x}"'
    header = request.headers.get("Range", "")
    if_range = request.headers.get("If-Range", "")
    first, last, status = 0, size - 1, 200
    if header and (not if_range or if_range == etag):
        try:
            first, last = parse_range(header, size)
        except RangeNotSatisfiable as exc:
            refused = HttpResponse(f"{exc.message}\n", status=416, content_type="text/plain; charset=utf-8")
            refused["Content-Range"] = f"bytes */{size}"
            refused["Accept-Ranges"] = "bytes"
            return refused
        status = 206
    length = max(0, last - first + 1)
    response: HttpResponseBase
    if request.method == "HEAD":
        response = HttpResponse(b"", content_type=content_type, status=status)
    elif status == 200:
        response = FileResponse(path.open("rb"), content_type=content_type)
    else:
        response = StreamingHttpResponse(_read_range(path, first, length), content_type=content_type, status=status)
    response["Content-Length"] = str(length)
    response["Accept-Ranges"] = "bytes"
    response["ETag"] = etag
    if status == 206:
        response["Content-Range"] = f"bytes {first}-{last}/{size}"
    disposition = content_disposition_header(True, filename) if filename else None  # None only without a name
    if disposition:
        response["Content-Disposition"] = disposition
    return response

"""The site page's bundles, for air-gapped sites: make a bundle in (a download), take a bundle out (an upload).

Both need ``operate`` on the site, as tokens and installers do: a bundle in
carries the site's signed desired states and the models placed there, and a
bundle out changes what the control plane holds for a node. The services
(``sites.bundles``, ``sites.bundles_out``) write the audit events.

* Making a bundle in is a plain form POST (never HTMX), so the browser saves
  the answer as a file. The bundle is written to a temporary directory that is
  removed before the answer streams: the open file is all that is left of it,
  and it goes when the download ends. Only single-file bundles are made here;
  parts for removable media come from ``manage.py bundle_export --part-size``.
* Uploading a bundle out writes every byte to a temporary file (never to
  memory) and stops past :data:`BUNDLE_OUT_MAX_BYTES`. The upload must be a
  bundle out of this site: the file's own metadata is read first, so a bundle of
  another site is refused here, not imported through this site's page.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler
from django.http import FileResponse, HttpRequest, HttpResponse, HttpResponseBase
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_POST

from audit.services import Actor
from core.htmx import render_page, wants_partial
from edge_runtime.airgap.bundle import BundleRefused, read_metadata
from orchestrator.asgi_limits import BUNDLE_OUT_MAX_BYTES, MULTIPART_ALLOWANCE_BYTES
from sites.bundles import MAX_VALID_FOR, bundle_export
from sites.bundles_out import bundle_import
from sites.models import Site
from sites.selectors import site_bundles
from sites.services import SitesError
from sites.views import _site_context, _site_for, _site_page_context

MAX_VALID_DAYS = MAX_VALID_FOR.days
# A name like FILE.001: one part of a bundle split for removable media.
PART_NAME = re.compile(r"\.\d{3}$")
TEMPLATE = "sites/site_detail.html"
PANEL = "bundles-panel"


class BundleInForm(forms.Form):
    full = forms.BooleanField(required=False)
    valid_days = forms.IntegerField(label="Valid for (days)", min_value=1, max_value=MAX_VALID_DAYS)


class BundleOutForm(forms.Form):
    file = forms.FileField(label="Bundle out")


@login_required
@require_POST
def bundle_in_make(request: HttpRequest, slug: str) -> HttpResponseBase:
    """Write the site's next bundle in and answer it as a download; a refusal re-renders the page (400)."""
    site = _site_for(request, slug, "operate")
    form = BundleInForm(request.POST)
    if not form.is_valid():
        return _panel(request, site, status=400, in_form=form)
    directory = Path(tempfile.mkdtemp(prefix="edgewise-bundle-in-", dir=settings.FILE_UPLOAD_TEMP_DIR))
    try:
        valid_for = dt.timedelta(days=form.cleaned_data["valid_days"])
        made = bundle_export(actor=Actor.from_request(request), site=site, path=directory / "bundle.ewb",
                             full=form.cleaned_data["full"], valid_for=valid_for, user=request.user)
        # Opened before the directory goes: on POSIX the open file stays readable, and is gone once closed.
        stream = made.paths[0].open("rb")
    except SitesError as exc:
        form.add_error("valid_days" if exc.field == "valid_for" else None, exc.message)
        return _panel(request, site, status=400, in_form=form)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    response = FileResponse(stream, as_attachment=True, filename=f"{site.slug}-in-{made.bundle.sequence}.ewb",
                            content_type="application/octet-stream")
    response["Cache-Control"] = "no-store"
    return response


class _BundleOutUpload(TemporaryFileUploadHandler):
    """Every byte of the upload to a temporary file, never to memory; past the limit it stops, nothing kept."""

    too_large = False

    def handle_raw_input(self, input_data: Any, META: Any, content_length: int, boundary: Any,
                         encoding: str | None = None) -> None:
        # A body declared too large is not written at all (new_file stops it before the first byte).
        self.too_large = content_length > BUNDLE_OUT_MAX_BYTES + MULTIPART_ALLOWANCE_BYTES

    def new_file(self, *args: Any, **kwargs: Any) -> None:
        if self.too_large:
            raise StopUpload()
        super().new_file(*args, **kwargs)

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes | None:
        if start + len(raw_data) > BUNDLE_OUT_MAX_BYTES:
            self.too_large = True
            raise StopUpload()  # the parser closes (and so deletes) the partial file
        return super().receive_data_chunk(raw_data, start)


@csrf_exempt  # checked by _bundle_out_upload, once the upload handler is in place (before the body is read)
@login_required
@require_POST
def bundle_out_upload(request: HttpRequest, slug: str) -> HttpResponse:
    # Who may not operate the site is answered before a byte of the body is written anywhere.
    site = _site_for(request, slug, "operate")
    handler = _BundleOutUpload(request)
    request.upload_handlers = [handler]
    return _bundle_out_upload(request, site, handler)


@csrf_protect
def _bundle_out_upload(request: HttpRequest, site: Site, handler: _BundleOutUpload) -> HttpResponse:
    """Import an uploaded bundle out of this site; the page (or the panel, for HTMX) says what was taken."""
    form = BundleOutForm(request.POST, request.FILES)
    if handler.too_large:
        limit = f"{BUNDLE_OUT_MAX_BYTES // (1024 * 1024)} MiB"
        return _panel(request, site, status=400,
                      out_error=f"The file is larger than a bundle out may be ({limit}): nothing was taken.")
    if not form.is_valid():
        return _panel(request, site, status=400, out_error="Choose the bundle out file a node wrote.")
    upload: UploadedFile = form.cleaned_data["file"]
    try:
        taken = _import(request, site, Path(upload.temporary_file_path()))  # type: ignore[attr-defined]
    except BundleRefused as exc:
        hint = (" (this looks like one part of a split bundle: join the parts with cat FILE.001 FILE.002 … > FILE "
                "and upload the joined file)") if PART_NAME.search(upload.name or "") else ""
        return _panel(request, site, status=400, out_error=f"Refused: {exc}{hint}; nothing was taken.")
    finally:
        upload.close()
    return _panel(request, site, imported={"bundle": taken.bundle, "again": taken.again})


def _import(request: HttpRequest, site: Site, path: Path) -> Any:
    meta = read_metadata(path).signed
    if meta.direction == "out" and meta.site != site.slug:
        # bundle_import would take it for its own site: through this page, only this site's bundles are taken.
        raise BundleRefused(f"this bundle out was written by a node of site {meta.site}, not {site.slug}: "
                            "upload it on that site's page")
    return bundle_import(actor=Actor.from_request(request), path=path, user=request.user)


def _panel(request: HttpRequest, site: Site, *, status: int = 200, **extra: Any) -> HttpResponse:
    """The site page with the bundles panel showing ``extra``; only the panel for an HTMX request."""
    if wants_partial(request):
        context = _site_context(request, site, bundles=site_bundles(site=site), **extra)
    else:
        context = _site_page_context(request, site, **extra)
    return render_page(request, TEMPLATE, PANEL, context, status=status)

"""The downloadable installer: one shell script per site, with a token baked in.

A site technician runs it on a Linux box with Python 3.11+. It creates a
virtual environment, installs the ``edge-runtime`` wheel from this control
plane (pinned by sha256, so the code is exactly what this control plane
serves, never a same-named package from elsewhere) with the extra of one
onnxruntime variant (``--onnxruntime cpu|gpu|openvino|directml|auto``; a
re-run keeps the variant installed, and one variant is never installed over
another), checks the result with ``pip check``, enrolls the node with
the control plane's key fingerprint pinned (the token goes to ``edge-runtime
enroll --token-stdin`` on a pipe from the shell's builtin ``printf``, so it is
on no process's command line or environment), and starts it (systemd when
there is one and it runs as root). The script is ``templates/sites/
installer.sh``; every value put into it goes through ``shlex.quote``, so
nothing from a site's name or a URL can turn into shell code.
"""

from __future__ import annotations

import re
import shlex
from urllib.parse import urlsplit

from django.template.loader import render_to_string

from sites import services, wheel
from sites.models import EnrollmentToken, Site

TEMPLATE = "sites/installer.sh"
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InstallerError(ValueError):
    """A value cannot go into an installer; the message names which and why."""


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise InstallerError(f"url: {url!r} is not an http(s) URL with a host")
    if parts.query or parts.fragment or _CONTROL.search(url):
        raise InstallerError(f"url: {url!r} must not carry a query, a fragment or control characters")
    return url.rstrip("/")


def _comment_safe(text: str) -> str:
    """One line of text for a ``#`` comment: a newline must not end the comment."""
    return " ".join(_CONTROL.sub(" ", text).split())


def _token_terms(site: Site, token: str) -> tuple[str, str]:
    row = EnrollmentToken.objects.filter(site=site, token_hash=services.secret_hash(token)).first()
    if row is None:
        return "as many as it allows", ""
    left = max(row.max_uses - row.uses, 0)
    uses = "one node" if row.max_uses == 1 else f"{left} more of {row.max_uses} nodes"
    return uses, f" at {row.expires_at:%Y-%m-%d %H:%M} UTC"


def render_installer(*, url: str, token: str, fingerprint: str, site: Site) -> str:
    """The installer script for ``site``: enroll with ``token`` at ``url``, pinning ``fingerprint``."""
    base = _check_url(url)
    if not token or _CONTROL.search(token):
        raise InstallerError("token: an enrollment token without control characters is required")
    if not _FINGERPRINT.match(fingerprint):
        raise InstallerError(f"fingerprint: {fingerprint!r} is not a sha256 fingerprint (64 lowercase hex digits)")
    runtime = wheel.runtime_wheel()
    uses, expiry = _token_terms(site, token)
    context = {
        "site_label": _comment_safe(f"{site.name} ({site.slug})"),
        "script_name": f"edgewise-install-{site.slug}.sh",
        "token_uses": uses,
        "token_expiry": expiry,
        "url": shlex.quote(base),
        "token": shlex.quote(token),
        "fingerprint": shlex.quote(fingerprint),
        "site_slug": shlex.quote(site.slug),
        "version": shlex.quote(runtime.version),
        "wheel_filename": shlex.quote(runtime.filename),
        "wheel_sha256": shlex.quote(runtime.sha256),
    }
    return render_to_string(TEMPLATE, context)

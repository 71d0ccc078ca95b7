"""The Content-Security-Policy of every HTML page the control plane serves.

Django 5.2 has no CSP of its own; this middleware sets one strict policy on
every ``text/html`` response (a view that set its own header keeps it):
scripts, styles, fonts, images and connections only from the control plane
itself, no inline script or style, no eval, no plugins, no framing, and forms
that post only here. A script injected into a page through some name that
escaped its escaping therefore does not run.

What the console does to live under it:

* every script is a file under ``static/``; the only ``<script>`` elements
  without ``src`` are ``json_script``'s ``application/json`` data blocks,
  which a browser never executes (CSP does not govern them);
* no ``on*=`` or ``hx-on`` attributes; htmx is configured (``base.html``) not
  to eval, not to run scripts in swapped content and not to inject its
  indicator ``<style>`` (those rules are in ``console.css``);
* no ``style="..."`` attributes: lengths such as the rollout progress bar's
  are SVG attributes, and Leaflet positions the map through the CSSOM
  (``element.style``), which CSP allows;
* ``connect-src 'self'`` covers the console's websockets: under CSP Level 3,
  which Chromium and Firefox implement, ``'self'`` matches ``ws:`` from an
  ``http:`` page and ``wss:`` from an ``https:`` page of the same host and
  port (the browser tests check it);
* ``img-src`` adds ``data:`` for Leaflet's and the admin's inline images, and
  the origin of a tile server configured with ``EDGEWISE_MAP_TILE_URL``.

The Django admin runs under the same policy: its templates carry no inline
script, handler or style attribute (checked in the browser tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponseBase
from django.utils.decorators import sync_and_async_middleware

HEADER = "Content-Security-Policy"

POLICY: dict[str, tuple[str, ...]] = {
    "default-src": ("'self'",),
    "script-src": ("'self'",),
    "style-src": ("'self'",),
    "img-src": ("'self'", "data:"),
    "connect-src": ("'self'",),
    "font-src": ("'self'",),
    "object-src": ("'none'",),
    "base-uri": ("'self'",),
    "form-action": ("'self'",),
    "frame-ancestors": ("'none'",),
}


def tile_source(tile_url: str) -> str | None:
    """The CSP source that lets the map load tiles from ``tile_url``; None for a path of this server."""
    if not tile_url or tile_url.startswith("/"):
        return None
    parts = urlsplit(tile_url)
    # Leaflet's {s} picks one of several subdomains: any of them may serve a tile.
    host = parts.netloc.replace("{s}", "*")
    if parts.scheme not in ("http", "https") or not host or any(c in host for c in "{} ;,'\""):
        raise ImproperlyConfigured(
            f"EDGEWISE_MAP_TILE_URL must be an http(s) URL whose host is a name, an address or "
            f"{{s}}.name, not {tile_url!r}")
    return f"{parts.scheme}://{host}"


def policy(*, tile_url: str = "") -> str:
    """The header's value, for an installation whose map tiles come from ``tile_url`` (empty: bundled basemap)."""
    directives = dict(POLICY)
    source = tile_source(tile_url)
    if source:
        directives["img-src"] = (*directives["img-src"], source)
    return "; ".join(f"{name} {' '.join(values)}" for name, values in directives.items())


def _with_policy(response: HttpResponseBase, value: str) -> HttpResponseBase:
    if response.get("Content-Type", "").startswith("text/html") and HEADER not in response:
        response[HEADER] = value
    return response


# Under ASGI the stack stays asynchronous through this middleware (no thread hop per request).
@sync_and_async_middleware
def content_security_policy_middleware(get_response: Callable[[HttpRequest], Any]) -> Any:
    # Worked out once, at start: a bad tile URL stops the control plane from starting, naming the variable.
    value = policy(tile_url=settings.MAP_TILE_URL)
    if iscoroutinefunction(get_response):
        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            response = await get_response(request)
            return _with_policy(response, value)

        return markcoroutinefunction(async_middleware)

    def middleware(request: HttpRequest) -> HttpResponseBase:
        return _with_policy(get_response(request), value)

    return middleware


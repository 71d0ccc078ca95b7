"""Pages that answer an HTMX request with one of their partials.

A view renders its page, or, when HTMX asks for a fragment, the page's
partial (``"page.html#name"``, django-template-partials). Such a response
varies on ``HX-Request``: the same URL answers with a page or a fragment,
and caches must tell them apart.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.cache import patch_vary_headers
from django_htmx.middleware import HtmxDetails


class HtmxHttpRequest(HttpRequest):
    """A request that went through django-htmx's middleware."""

    htmx: HtmxDetails


def wants_partial(request: HttpRequest) -> bool:
    """Whether ``request`` asks for a fragment: an HTMX request that is neither boosted nor a history restore
    (the back button after a cache miss needs the whole page)."""
    htmx = getattr(request, "htmx", None)
    return htmx is not None and bool(htmx) and not htmx.boosted and not htmx.history_restore_request


def render_page(request: HttpRequest, template: str, partial: str, context: dict[str, Any],
                status: int = 200) -> HttpResponse:
    """``template``, or its ``partial`` when the request wants one; varies on ``HX-Request``."""
    name = f"{template}#{partial}" if wants_partial(request) else template
    response = render(request, name, context, status=status)
    patch_vary_headers(response, ["HX-Request"])
    return response

"""Test-only middleware for the control plane processes the tests start.

Each transactional test flushes the database, and the flush recreates
content types under new ids. A control-plane process that lives across tests
would otherwise keep the old ids in Django's ContentType cache and answer
object-permission checks (django-guardian) from them.
"""

from __future__ import annotations

from collections.abc import Callable

from django.contrib.contenttypes.models import ContentType
from django.http import HttpRequest, HttpResponse

Handler = Callable[[HttpRequest], HttpResponse]


def clear_content_type_cache(get_response: Handler) -> Handler:
    def middleware(request: HttpRequest) -> HttpResponse:
        ContentType.objects.clear_cache()
        return get_response(request)

    return middleware

"""Counts every request Django routes, by URL name and status class, with one Redis round trip."""

from __future__ import annotations

import time
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from edge_runtime.protocol import SYNC_PATH_HEADER
from metrics.counters import UNMATCHED, request_count

Handler = Callable[[HttpRequest], HttpResponse]


def request_metrics_middleware(get_response: Handler) -> Handler:
    def middleware(request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        # An exception in a view has become a 500 response by the time it gets here.
        response = get_response(request)
        seconds = time.perf_counter() - started
        # The URL name ("agent:node-sync"), never the path: paths carry node ids and anything a client
        # makes up, and each label value is a series of its own in Prometheus.
        match = getattr(request, "resolver_match", None)
        request_count(route=match.view_name if match else UNMATCHED, status=response.status_code, seconds=seconds,
                      sync_path=response.headers.get(SYNC_PATH_HEADER, ""))
        return response

    return middleware

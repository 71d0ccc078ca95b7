from __future__ import annotations

import hmac

import redis
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from metrics.collect import metric_families
from metrics.exposition import CONTENT_TYPE, render

NEEDS = "Authorization: Bearer <EDGEWISE_METRICS_TOKEN>, or an administrator's session"


def _error(message: str, status: int) -> JsonResponse:
    response = JsonResponse({"error": message}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="edgewise metrics"'
    return response


def _refusal(request: HttpRequest) -> JsonResponse | None:
    """None when the request may read the metrics, else the answer that says why not."""
    header = request.headers.get("Authorization", "")
    if header:
        # A credential sent decides alone, also beside a session: a scraper's wrong token is never covered up.
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return _error(f"malformed Authorization header: metrics need {NEEDS}", 401)
        if not settings.METRICS_TOKEN:
            return _error("no metrics token is configured on this control plane (EDGEWISE_METRICS_TOKEN)", 403)
        if not hmac.compare_digest(credential.strip().encode(), settings.METRICS_TOKEN.encode()):
            return _error("wrong metrics token", 403)
        return None
    if request.user.is_authenticated:
        if request.user.is_superuser:
            return None
        return _error("metrics are estate-wide: only an administrator or a scraper with the metrics token may "
                      "read them", 403)
    return _error(f"metrics need {NEEDS}", 401)


@require_GET
def metrics_scrape(request: HttpRequest) -> HttpResponse:
    """The control plane's metrics in Prometheus's text format (``edgewise_*``; see ``metrics.collect``).

    Who may read them: they are figures of the whole estate (every region's
    nodes, rollouts and queries), so either a scraper that sends
    ``Authorization: Bearer <EDGEWISE_METRICS_TOKEN>`` (the token compared in
    constant time; with no token configured every bearer is refused), or a
    browser session of a superuser. Nobody else: no credential gets 401 with
    ``WWW-Authenticate: Bearer``; a wrong token, or a session of a user who is
    not an administrator, 403 (region-scoped staff would otherwise learn the
    size of regions they may not see). A Redis that cannot be reached gets
    503, so Prometheus marks the target down instead of recording counters that
    went back to zero.
    """
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    try:
        body = render(metric_families(now=timezone.now()))
    except redis.RedisError as exc:
        return _error(f"the metrics store (Redis) cannot be reached: {exc}", 503)
    response = HttpResponse(body, content_type=CONTENT_TYPE)
    response["Cache-Control"] = "no-store"
    return response

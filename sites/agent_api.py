"""The agent protocol, version 1 (see ``edge_runtime.protocol``).

Plain JSON views: bodies are validated with the shared wire models, errors are
``{"error": ..., "field": ...}`` with a 4xx status, and nothing is written
unless the whole request is valid. A node is authenticated by its bearer
credential and reaches only its own resources: any other node's URL answers
404 exactly as an unknown one does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from pydantic import BaseModel, ValidationError

from audit.services import client_ip
from edge_runtime import protocol
from orchestrator import keys
from sites import services
from sites.models import DesiredState, Node

W = TypeVar("W", bound=BaseModel)
View = Callable[..., HttpResponse]


def error(message: str, status: int, field: str | None = None) -> JsonResponse:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return JsonResponse(body, status=status)


class BadRequest(Exception):
    def __init__(self, response: JsonResponse) -> None:
        self.response = response


def parse_body(request: HttpRequest, model: type[W]) -> W:
    length = request.META.get("CONTENT_LENGTH") or "0"
    try:
        declared = int(length)
    except ValueError:
        declared = 0
    if declared > protocol.MAX_AGENT_BODY_BYTES:
        raise BadRequest(error(f"request body of {declared} bytes exceeds the limit of "
                               f"{protocol.MAX_AGENT_BODY_BYTES} bytes", 413))
    body = request.read(protocol.MAX_AGENT_BODY_BYTES + 1)
    if len(body) > protocol.MAX_AGENT_BODY_BYTES:
        raise BadRequest(error(f"request body exceeds the limit of {protocol.MAX_AGENT_BODY_BYTES} bytes", 413))
    content_type = request.content_type or ""
    if content_type != "application/json":
        raise BadRequest(error(f"content type must be application/json, not {content_type or 'none'}", 415))
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(error(f"request body is not valid JSON: {exc}", 400)) from exc
    if not isinstance(data, dict):
        raise BadRequest(error("request body must be a JSON object", 400))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequest(error(f"{field or 'body'}: {first['msg']}", 400, field)) from exc


def node_view(view: View) -> View:
    """Authenticate the bearer credential and bind the path's node to it."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, node_id: Any, *args: Any, **kwargs: Any) -> HttpResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            return error("missing bearer credential", 401)
        node = services.node_authenticate(credential.strip())
        if node is None:
            return error("unknown node credential", 401)
        if str(node.uuid) != str(node_id):
            # Another node's resource: indistinguishable from one that does not exist.
            return error("no such node", 404)
        if node.revoked_at is not None:
            return error("this node's credential was revoked", 403)
        return view(request, node, *args, **kwargs)

    return wrapper


def _handle(fn: Callable[[], HttpResponse]) -> HttpResponse:
    try:
        return fn()
    except BadRequest as exc:
        return exc.response
    except services.SitesError as exc:
        return error(exc.message, exc.status, exc.field)


@csrf_exempt
@require_POST
def enroll(request: HttpRequest) -> HttpResponse:
    def run() -> HttpResponse:
        body = parse_body(request, protocol.EnrollRequest)
        node, credential = services.node_enroll(request=body, ip=client_ip(request))
        response = protocol.EnrollResponse(
            node_id=str(node.uuid),
            site=node.site.slug,
            credential=credential,
            signing_public_key=keys.public_key_b64(),
            signing_key_fingerprint=keys.public_key_fingerprint(),
            sync_interval_s=services.settings.SYNC_INTERVAL_S,
        )
        return JsonResponse(response.model_dump(mode="json"), status=201)

    return _handle(run)


@csrf_exempt
@require_POST
@node_view
def sync(request: HttpRequest, node: Node) -> HttpResponse:
    def run() -> HttpResponse:
        body = parse_body(request, protocol.SyncRequest)
        response = services.node_sync(node=node, request=body, ip=client_ip(request))
        return JsonResponse(response.model_dump(mode="json"))

    return _handle(run)


@require_GET
@node_view
def desired_state(request: HttpRequest, node: Node) -> HttpResponse:
    state = DesiredState.objects.filter(node=node).first()
    if state is None:
        return error("no desired state published for this node yet", 404)
    return JsonResponse(services.signed_desired_state(state).model_dump(mode="json"))


@require_GET
def health(request: HttpRequest) -> HttpResponse:
    """Liveness of the control plane itself; touches nothing."""
    return JsonResponse({"status": "ok", "protocol": protocol.PROTOCOL_VERSION})

"""The agent protocol, version 1 (see ``edge_runtime.protocol``).

Plain JSON views: bodies are validated with the shared wire models, errors are
``{"error": ..., "field": ...}`` with a 4xx status, and nothing is written
unless the whole request is valid. Whatever a node sends is answered with a
4xx naming the field (``body`` for the document as a whole), never a 5xx: a
body is read as strict UTF-8 JSON (:func:`read_json`), and what no column or
later JSON could hold (nesting past ``MAX_JSON_DEPTH``, integers outside int64,
NaN and infinities, NUL and unpaired surrogates) is refused with its path
before the wire models bound each field by the column it is written to. A node is authenticated by its bearer
credential and reaches only its own resources: any other node's URL answers
404 exactly as an unknown one does.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import DataError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from pydantic import BaseModel, ValidationError

from audit.services import client_ip
from edge_runtime import protocol
from orchestrator import keys
from orchestrator.desired_state import signed_desired_state
from orchestrator.models import DesiredState
from sites import quiet_sync, services
from sites.models import Node
from sites.sync import node_sync

W = TypeVar("W", bound=BaseModel)
View = Callable[..., HttpResponse]

logger = logging.getLogger("edgewise.agent_api")

# PostgreSQL cannot store NUL, and a lone surrogate cannot be encoded as UTF-8 at all.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# More digits than any int64 has: kept as text by the reader, refused with its path by the walk.
_INT_DIGITS = 20


def error(message: str, status: int, field: str | None = None) -> JsonResponse:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return JsonResponse(body, status=status)


class BadRequest(Exception):
    def __init__(self, response: JsonResponse) -> None:
        self.response = response


class _Number(str):
    """A number JSON cannot carry into the database (NaN, Infinity, an integer past int64), as the node wrote it."""


def _read_float(text: str) -> float | _Number:
    value = float(text)
    return value if math.isfinite(value) else _Number(text)


def _read_int(text: str) -> int | _Number:
    return int(text) if len(text.lstrip("-")) <= _INT_DIGITS else _Number(text)


def _refuse(message: str, field: str, status: int = 400) -> BadRequest:
    return BadRequest(error(message, status, field))


def _check_values(data: Any) -> None:
    """Refuse what no column can store, naming where it is: nesting past MAX_JSON_DEPTH, NUL and lone
    surrogates in strings (keys too), integers outside int64, NaN and infinities.

    Iterative, so hostile nesting costs no Python stack; every value is seen once.
    """
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict | list):
            if len(path) >= protocol.MAX_JSON_DEPTH:
                raise _refuse(f"{_dotted(path)}: nested deeper than {protocol.MAX_JSON_DEPTH} levels", _dotted(path))
            if isinstance(value, dict):
                for key, item in value.items():
                    if _UNSTORABLE.search(key):
                        raise _refuse(f"{_dotted(path)}: a key holds a NUL or an unpaired surrogate",
                                      _dotted(path))
                    stack.append((item, (*path, key)))
            else:
                stack.extend((item, (*path, i)) for i, item in enumerate(value))
        elif isinstance(value, _Number):
            raise _refuse(f"{_dotted(path)}: {value[:40]} is not a number that can be stored "
                          f"(finite, integers within ±2^63)", _dotted(path))
        elif isinstance(value, str):
            if _UNSTORABLE.search(value):
                raise _refuse(f"{_dotted(path)}: text holds a NUL or an unpaired surrogate", _dotted(path))
        elif isinstance(value, int) and not isinstance(value, bool):
            if not -protocol.INT64_MAX - 1 <= value <= protocol.INT64_MAX:
                raise _refuse(f"{_dotted(path)}: {value} is outside the range of a 64-bit integer", _dotted(path))


def _dotted(path: tuple[str | int, ...]) -> str:
    """The field a path names, as the error bodies write it: ``body`` for the whole document."""
    return ".".join(str(p) for p in path) or "body"


def read_json(body: bytes) -> Any:
    """A node's JSON body, or BadRequest naming what cannot be read (never an exception of the parser)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refuse(f"request body is not UTF-8: {exc.reason} at byte {exc.start}", "body") from None
    try:
        data = json.loads(text, parse_float=_read_float, parse_int=_read_int, parse_constant=_Number)
    except json.JSONDecodeError as exc:
        raise _refuse(f"request body is not valid JSON: {exc}", "body") from None
    except RecursionError:
        raise _refuse(f"request body is not valid JSON: nested deeper than {protocol.MAX_JSON_DEPTH} levels",
                      "body") from None
    except ValueError as exc:
        raise _refuse(f"request body is not valid JSON: {exc}", "body") from None
    _check_values(data)
    return data


def validation_error(exc: ValidationError) -> BadRequest:
    """The first error pydantic found, as a 400 naming its field (``body`` when it is the whole document)."""
    first = exc.errors(include_url=False)[0]
    field = _dotted(tuple(first["loc"]))
    return _refuse(f"{field}: {first['msg']}", field)


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
    data = read_json(body)
    if not isinstance(data, dict):
        raise _refuse("request body must be a JSON object", "body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def _bearer(request: HttpRequest) -> str | None:
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    return credential.strip() if scheme.lower() == "bearer" and credential.strip() else None


def _node_for(credential: str, node_id: Any) -> Node | JsonResponse:
    """The node holding ``credential`` if it is the path's node and not revoked; else the answer refusing it."""
    node = services.node_authenticate(credential)
    if node is None:
        return error("unknown node credential", 401)
    if str(node.uuid) != str(node_id):
        # Another node's resource: indistinguishable from one that does not exist.
        return error("no such node", 404)
    if node.revoked_at is not None:
        return error("this node's credential was revoked", 403)
    return node


def node_view(view: View) -> View:
    """Authenticate the bearer credential and bind the path's node to it."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, node_id: Any, *args: Any, **kwargs: Any) -> HttpResponse:
        credential = _bearer(request)
        if credential is None:
            return error("missing bearer credential", 401)
        node = _node_for(credential, node_id)
        if isinstance(node, JsonResponse):
            return node
        return view(request, node, *args, **kwargs)

    return wrapper


def _handle(fn: Callable[[], HttpResponse]) -> HttpResponse:
    try:
        return fn()
    except BadRequest as exc:
        return exc.response
    except services.SitesError as exc:
        return error(exc.message, exc.status, exc.field)
    except DataError as exc:
        # A value the wire models let through that a column still refused: the node's input, not our
        # fault, so a 400; logged, because the wire model should have named the field.
        logger.exception("a node's request held a value the database refused")
        return error(f"a value in the request cannot be stored: {str(exc).splitlines()[0][:200]}", 400, "body")


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
def sync(request: HttpRequest, node_id: Any) -> HttpResponse:
    """A node's sync: answered from Redis when it reports nothing new (``sites.quiet_sync``), else in full.

    The credential is checked before anything the body says is used, as on every node route: in the quiet
    answer's one Redis script (against the credential hash its last full sync left), or in the database.
    """
    credential = _bearer(request)
    if credential is None:
        return error("missing bearer credential", 401)

    def run() -> HttpResponse:
        try:
            body = parse_body(request, protocol.SyncRequest)
        except BadRequest as exc:
            node = _node_for(credential, node_id)
            return node if isinstance(node, JsonResponse) else exc.response
        ip = client_ip(request)
        # Checked already, and not quiet, when sites.quiet_asgi stood in front of this view.
        tried = getattr(request, "scope", {}).get(quiet_sync.TRIED, False)
        answer = None if tried else quiet_sync.answer(node_id=str(node_id), credential=credential, request=body,
                                                      ip=ip)
        if answer is not None:
            return JsonResponse(answer, headers={protocol.SYNC_PATH_HEADER: "quiet"})
        node = _node_for(credential, node_id)
        if isinstance(node, JsonResponse):
            return node
        if body.brief:
            return JsonResponse(quiet_sync.report_wanted(node), headers={protocol.SYNC_PATH_HEADER: "report-wanted"})
        return JsonResponse(node_sync(node=node, request=body, ip=ip).model_dump(mode="json"),
                            headers={protocol.SYNC_PATH_HEADER: "full"})

    return _handle(run)


@require_GET
@node_view
def desired_state(request: HttpRequest, node: Node) -> HttpResponse:
    state = DesiredState.objects.filter(node=node).first()
    if state is None:
        return error("no desired state published for this node yet", 404)
    return JsonResponse(signed_desired_state(state).model_dump(mode="json"))


@require_GET
def health(request: HttpRequest) -> HttpResponse:
    """Liveness of the control plane itself; touches nothing."""
    return JsonResponse({"status": "ok", "protocol": protocol.PROTOCOL_VERSION})

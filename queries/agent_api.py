"""The agent endpoint of federated queries: a node posts its answer (see ``edge_runtime.protocol``).

Authenticated and scoped like every agent endpoint (``sites.agent_api.node_view``):
a node reaches only the queries it was asked. An answer is stored once; a
repeat answers 200 with ``"stored": false``, so a node that lost the first
reply stops retrying.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from pydantic import ValidationError

from audit.services import Actor, client_ip
from edge_runtime.data.wire import QueryResult
from edge_runtime.protocol import MAX_QUERY_RESULT_BYTES
from queries.services import QueriesError
from queries.services.results import query_result_record
from sites.agent_api import error, node_view, validation_error
from sites.models import Node


@csrf_exempt
@require_POST
@node_view
def query_result(request: HttpRequest, node: Node, query_id: str) -> HttpResponse:
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or "0")
    except ValueError:
        declared = 0
    if declared > MAX_QUERY_RESULT_BYTES:
        return error(f"an answer of {declared} bytes exceeds the limit of {MAX_QUERY_RESULT_BYTES} bytes", 413)
    body = request.read(MAX_QUERY_RESULT_BYTES + 1)
    if len(body) > MAX_QUERY_RESULT_BYTES:
        return error(f"an answer exceeds the limit of {MAX_QUERY_RESULT_BYTES} bytes", 413)
    if (request.content_type or "") != "application/json":
        return error(f"content type must be application/json, not {request.content_type or 'none'}", 415)
    try:
        # Pydantic's own JSON reader: the NaN and Infinity constants of a partial come through, and it
        # refuses invalid UTF-8, unpaired surrogates and nesting past its recursion limit as invalid JSON.
        result = QueryResult.model_validate_json(body)
    except ValidationError as exc:
        return validation_error(exc).response
    if result.query_id and result.query_id != query_id:
        return error(f"query_id: the answer is for {result.query_id!r}, not {query_id!r}", 400, "query_id")
    try:
        row, stored = query_result_record(node=node, query_id=query_id, result=result,
                                          actor=Actor.node(node, client_ip(request)))
    except QueriesError as exc:
        return error(exc.message, exc.status, exc.field)
    return JsonResponse({"stored": stored, "state": row.state}, status=201 if stored else 200)

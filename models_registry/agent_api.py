"""``GET /agent/v1/nodes/<node_id>/artifacts/<sha256>``: a model artifact, resumable.

A node gets only the artifacts in its own current desired models; any other
hash answers 404 exactly as one that does not exist, so a node credential
cannot probe what else the registry holds.
"""

from __future__ import annotations

import re

from django.http import HttpRequest, HttpResponseBase
from django.views.decorators.http import require_safe

from models_registry import storage
from models_registry.selectors import desired_models_for_node
from orchestrator.http import ranged_file_response
from sites.agent_api import error, node_view
from sites.models import Node

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@require_safe
@node_view  # type: ignore[arg-type]  # a file response is an HttpResponseBase, as node_view passes it on
def artifact(request: HttpRequest, node: Node, sha256: str) -> HttpResponseBase:
    if not _SHA256.match(sha256):
        return error("the artifact is named by its sha256: 64 lower-case hex digits", 400, "sha256")
    wanted = next((m for m in desired_models_for_node(node) if m.sha256 == sha256), None)
    if wanted is None:
        return error("no such artifact in this node's desired state", 404)
    path = storage.artifact_path(sha256)
    if not path.is_file():
        return error("the artifact is missing from the control plane's store", 404)
    return ranged_file_response(request, path, content_type="application/octet-stream",
                                filename=f"{wanted.name}-{wanted.version}-{wanted.variant}.onnx",
                                etag=f'"{sha256}"')

"""The model registry's part in every node's desired state and sync (see ``orchestrator.features``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime import signing
from models_registry import storage
from models_registry.models import ModelVariant, ModelVersion
from models_registry.reports import model_status_report
from models_registry.selectors import desired_models_for_node
from orchestrator.features import NodeFeatureBase, NodeSync

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


class ModelsFeature(NodeFeatureBase):
    """``models``: the versions a node should serve; what it reports of them; their artifacts' signatures."""

    name = "models"

    def desired(self, node: Any, cache: dict[Any, Any]) -> Mapping[str, Any]:
        return {"models": [m.model_dump(mode="json") for m in desired_models_for_node(node, cache)]}

    def report(self, sync: NodeSync) -> None:
        sync.audited |= model_status_report(node=sync.node, statuses=sync.actual.models, actor=sync.actor) > 0

    def sign_again(self, key: Ed25519PrivateKey) -> int:
        """Every signed artifact (versions and variants), signed with ``key``; inside the caller's transaction."""
        count = 0
        for version in ModelVersion.objects.select_for_update().exclude(signature=""):
            version.signature = signing.sign_artifact(version.sha256, key)
            version.save(update_fields=["signature"])
            count += 1
        for variant in ModelVariant.objects.select_for_update().all():
            variant.signature = signing.sign_artifact(variant.sha256, key)
            variant.save(update_fields=["signature"])
            count += 1
        return count

    def artifact_file(self, sha256: str) -> Path | None:
        path = storage.artifact_path(sha256)
        return path if path.is_file() else None

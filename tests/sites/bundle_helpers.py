"""Nodes of an air-gapped site and the bundles out they write, without a running node."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.utils import timezone

from audit.services import Actor
from edge_runtime import protocol, signing
from edge_runtime.airgap.writing import Source, write_bundle
from edge_runtime.protocol.airgap import HeldArtifact, NodeInventory
from sites import services
from sites.models import Node, Site

ACTOR = Actor.system("test")


def enroll(site: Site, name: str, key: Ed25519PrivateKey | None = None) -> Node:
    """A node enrolled at the depot, with its identity key registered (as edge-runtime enroll does)."""
    _, token = services.token_create(actor=ACTOR, site=site)
    public = base64.b64encode(signing.public_key_raw(key.public_key())).decode() if key else None
    node, _ = services.node_enroll(request=protocol.EnrollRequest(token=token, name=name, identity_key=public),
                                   ip="10.0.0.5")
    return Node.objects.get(pk=node.pk)


def bundle_out(path: Path, node: Node, key: Ed25519PrivateKey, *, sequence: int = 1,
               created: dt.datetime | None = None, held: list[HeldArtifact] | None = None,
               site: str | None = None, extra: list[Source] | None = None,
               report: dict[str, Any] | None = None) -> Path:
    """A bundle out as edge-runtime export-bundle writes one: the node's report and inventory, signed by ``key``."""
    created = created or timezone.now()
    if report is None:
        report = protocol.SyncRequest(runtime_version="0.1.0", actual=protocol.ActualState(applied_generation=1)
                                      ).model_dump(mode="json")
    sources = [Source.json("report.json", report),
               Source.json("inventory.json", NodeInventory(artifacts=held or [], bundle_in_sequence=1)
                           .model_dump(mode="json")), *(extra or [])]
    meta = {"direction": "out", "site": site or node.site.slug, "node": str(node.uuid), "sequence": sequence,
            "created": created, "expires": created + dt.timedelta(days=3650)}
    write_bundle(path, meta, sources, key)
    return path

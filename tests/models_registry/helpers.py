"""Factories for the registry's tests: models, uploaded versions and nodes."""

from __future__ import annotations

import io
import itertools
import secrets
from typing import Any

from audit.services import Actor
from models_registry import services
from models_registry.models import Model, ModelVersion
from sites.models import Node, Site
from sites.services import CREDENTIAL_PREFIX, secret_hash
from tests.models_registry import onnx_factory

ACTOR = Actor.system("test")
_counter = itertools.count(1)


def make_model(slug: str | None = None, **fields: Any) -> Model:
    slug = slug or f"model-{next(_counter)}"
    return services.model_create(actor=ACTOR, slug=slug, name=fields.pop("name", slug.title()), **fields)


def upload(model: Model, data: bytes | None = None, *, version: str | None = None, **requirements: Any
           ) -> ModelVersion:
    return services.model_version_upload(actor=ACTOR, model=model, version=version or f"1.{next(_counter)}",
                                         file=io.BytesIO(onnx_factory.linear() if data is None else data),
                                         **requirements)


def valid_version(model: Model | None = None, data: bytes | None = None, **requirements: Any) -> ModelVersion:
    """Upload and validate in this process (the worker path has its own test)."""
    version = upload(model or make_model(), data, **requirements)
    result = services.model_version_validate(version_id=version.pk)
    assert result is not None and result.status == "valid", result and result.validation_log
    return result


def make_node(site: Site, name: str, *, role: str = "server", memory_mb: int = 16384,
              providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> tuple[Node, str]:
    credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
    node = Node.objects.create(
        site=site, name=name, role=role, credential_hash=secret_hash(credential),
        hardware={"cpu_cores": 4, "memory_mb": memory_mb, "execution_providers": list(providers)},
    )
    return node, credential

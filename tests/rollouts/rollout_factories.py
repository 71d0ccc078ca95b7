"""Factories for rollout tests: models with versions, nodes that report through the real sync service."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

from django.utils import timezone

from audit.services import Actor
from edge_runtime.protocol import ActualState, ModelStats, ModelStatus, SyncRequest
from models_registry import services as registry
from models_registry.models import ModelVersion
from rollouts import engine
from rollouts.models import Rollout
from sites.models import Node, Site
from sites.sync import node_sync
from tests.models_registry import onnx_factory
from tests.models_registry.helpers import make_model, make_node, valid_version

ACTOR = Actor.system("test")
BOUNDS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]
_seed = itertools.count(10)


def two_versions(slug: str, **model_fields: Any) -> tuple[ModelVersion, ModelVersion]:
    model = make_model(slug, **model_fields)
    v1 = valid_version(model, onnx_factory.linear(seed=next(_seed)), version="1.0.0")
    v2 = valid_version(model, onnx_factory.linear(seed=next(_seed)), version="2.0.0")
    return v1, v2


def fleet(site: Site, count: int, prefix: str = "n", **kwargs: Any) -> list[Node]:
    nodes = [make_node(site, f"{prefix}{i}", **kwargs)[0] for i in range(count)]
    return nodes


def stats(requests: int, errors: int = 0, latency: float = 0.004) -> ModelStats:
    counts = [0] * (len(BOUNDS) + 1)
    counts[next((i for i, b in enumerate(BOUNDS) if latency <= b), len(BOUNDS))] = requests
    return ModelStats(requests=requests, errors=errors, latency_bounds=BOUNDS, latency_counts=counts)


def report(node: Node, *statuses: ModelStatus, applied: int | None = None) -> None:
    """The node syncs: it applied its current desired state and reports ``statuses``."""
    node = Node.objects.select_related("desired").get(pk=node.pk)
    generation = node.desired.generation if applied is None else applied
    node_sync(node=node, request=SyncRequest(actual=ActualState(applied_generation=generation,
                                                                applied_epoch=node.desired.epoch,
                                                                models=list(statuses))), ip=None)


def serving(model: str, version: str, requests: int = 0, errors: int = 0, latency: float = 0.004) -> ModelStatus:
    return ModelStatus(name=model, version=version, state="serving", stats=stats(requests, errors, latency))


def desired_versions(node: Node, model: str) -> list[str]:
    import json

    node = Node.objects.select_related("desired").get(pk=node.pk)
    return [m["version"] for m in json.loads(node.desired.payload)["models"] if m["name"] == model]


def tick(rollout: Rollout, *, after: float = 0.0) -> Rollout:
    now = timezone.now() + dt.timedelta(seconds=after)
    engine.rollout_advance(rollout_id=rollout.pk, now=now)
    return Rollout.objects.get(pk=rollout.pk)


def age(nodes: list[Node], seconds: float) -> None:
    """Pretend the nodes last synced ``seconds`` ago."""
    Node.objects.filter(pk__in=[n.pk for n in nodes]).update(last_seen_at=timezone.now() - dt.timedelta(
        seconds=seconds))


def deploy(version: ModelVersion, site: Site) -> None:
    registry.deployment_create(actor=ACTOR, version=version, sites=[site])


def rewind(rollout: Rollout, seconds: float) -> None:
    """Pretend the current wave switched (and began baking) ``seconds`` earlier."""
    delta = dt.timedelta(seconds=seconds)
    fresh = Rollout.objects.get(pk=rollout.pk)
    Rollout.objects.filter(pk=rollout.pk).update(
        wave_started_at=fresh.wave_started_at - delta if fresh.wave_started_at else None,
        bake_started_at=fresh.bake_started_at - delta if fresh.bake_started_at else None)

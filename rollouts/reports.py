"""What nodes report of a rollout's version, and the desired states that tell them.

A node's report counts only from the generation that carried its change on
(:func:`reports_new`, :func:`reports_previous`): a report before that may
predate the change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from audit.services import Actor
from orchestrator.desired_state import desired_state_publish_many
from orchestrator.models import DesiredState
from rollouts.models import RolloutNode
from sites.models import Node


def _statuses(node: Node, model: str) -> list[dict[str, Any]]:
    return [s for s in (node.actual_state or {}).get("models") or []
            if isinstance(s, dict) and s.get("name") == model]


def _caught_up(node: Node, row: RolloutNode) -> bool:
    return node.applied_generation >= row.generation > 0


def reports_new(node: Node, row: RolloutNode, model: str, version: str) -> tuple[str, str]:
    """("serving" | "failed" | "", error) for the new version, from a report at or after the change."""
    if not _caught_up(node, row):
        return "", ""
    for status in _statuses(node, model):
        if status.get("version") == version:
            if status.get("state") == "serving":
                return "serving", ""
            if status.get("state") in ("failed", "refused"):
                return "failed", str(status.get("error") or status.get("state"))
    return "", ""


def placements_new(rows: Iterable[RolloutNode], model: str, version: str) -> list[tuple[str, str, str]]:
    """(node, placement, why) for each node serving the new version: where its graph runs, as it reports."""
    found = []
    for row in rows:
        for status in _statuses(row.node, model):
            if status.get("version") == version and status.get("state") == "serving":
                found.append((f"{row.node.site.slug}/{row.node.name}", str(status.get("placement") or ""),
                              str(status.get("fallback") or "")))
    return found


def reports_previous(node: Node, row: RolloutNode, model: str, version: str) -> bool:
    """Is the node back on its previous version (or without the model, if it had none)?"""
    if not _caught_up(node, row):
        return False
    statuses = _statuses(node, model)
    if any(s.get("version") == version and s.get("state") == "serving" for s in statuses):
        return False
    if not row.previous_version:
        return True
    return any(s.get("version") == row.previous_version and s.get("state") == "serving" for s in statuses)


def desired_versions(nodes: Iterable[Node], model: str) -> dict[int, str]:
    """Per node id, the version of ``model`` its current desired state names ("" for none)."""
    found: dict[int, str] = {}
    for node_id, payload in DesiredState.objects.filter(node__in=[n.pk for n in nodes]).values_list(
            "node_id", "payload"):
        for entry in json.loads(payload).get("models", []):
            if entry.get("name") == model:
                found[node_id] = str(entry.get("version", ""))
    return found


def publish_row(row: RolloutNode, actor: Actor) -> None:
    """Publish one node's desired state and remember the generation that carries the change."""
    publish_rows([row], actor)


def publish_rows(rows: list[RolloutNode], actor: Actor) -> None:
    """Publish the nodes' desired states together (one transaction, one batch of nudges)."""
    states = desired_state_publish_many(nodes=[row.node for row in rows], actor=actor)
    for row in rows:
        row.generation = states[row.node.pk].generation

"""The one seam between a node's desired state and the features that fill it.

The control plane's counterpart of the node agent's plug-ins: each feature
app (models, policies, rollouts, queries) registers one :class:`NodeFeature`
from its ``AppConfig.ready()``, and the desired-state machinery
(:mod:`orchestrator.desired_state`, ``sites.sync``, :mod:`orchestrator.keys`)
reaches the features only through :func:`node_features`. So this layer
imports no feature, and a feature changes a node's state by calling
:func:`orchestrator.desired_state.desired_state_publish_many` like anyone.

Guarantees:

* Features are called in registration order, which is ``INSTALLED_APPS``
  order, the same in every process.
* A feature registers once: a second registration under the same name is an
  error, not a silent replacement.
* A desired-state key belongs to one feature: two features returning the same
  key is an error naming both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edge_runtime import protocol

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from audit.services import Actor


@dataclasses.dataclass
class NodeSync:
    """What one node's sync hands each feature, inside the sync's transaction (the node row locked).

    ``node.actual_state`` still holds the previous report when
    :meth:`NodeFeature.report` runs. A feature that wrote an audit event or an
    event row sets ``audited``: the sync's commit is then durable.
    """

    node: Any
    actual: protocol.ActualState
    actor: Actor
    audited: bool = False
    # Fields of the sync's answer (``protocol.SyncResponse``) that features fill.
    answer: dict[str, Any] = dataclasses.field(default_factory=dict)


class NodeFeature(Protocol):
    """A feature's part in every node's desired state and sync. Every method is safe to call twice."""

    name: str

    def desired(self, node: Any, cache: dict[Any, Any]) -> Mapping[str, Any]:
        """The keys of ``node``'s desired-state content this feature owns.

        ``cache`` lives for one publish of many nodes: what nodes share (per
        site, say) can be worked out once under a key of the feature's own.
        """
        ...

    def report(self, sync: NodeSync) -> None:
        """Store what the node reported about this feature (before its new actual state is stored)."""
        ...

    def answer(self, sync: NodeSync) -> None:
        """Add this feature's fields to the sync's answer (after the desired state is settled)."""
        ...

    def sign_again(self, key: Ed25519PrivateKey) -> int:
        """Sign again, with a new key, whatever this feature signed; how many signatures were made."""
        ...

    def artifact_file(self, sha256: str) -> Path | None:
        """The file of an artifact this feature stores, by sha256 (for a bundle carried to a site); None: not ours."""
        ...

    def carried(self, sync: NodeSync, members: Mapping[str, bytes]) -> None:
        """Take this feature's part of a node's bundle out (``members``: its small members' bytes, by name,
        each checked against the bundle's signed metadata).

        Inside the import's transaction. What the feature stored goes into ``sync.answer`` as fields of the
        receipt the next bundle in carries (``edge_runtime.protocol.airgap.BundleReceipt``), what it could not
        take into ``sync.answer["notes"]`` (a list of strings). Importing the same members again changes nothing.
        """
        ...


class NodeFeatureBase:
    """A feature that takes part in nothing: subclasses override what they contribute."""

    name = ""

    def desired(self, node: Any, cache: dict[Any, Any]) -> Mapping[str, Any]:
        return {}

    def report(self, sync: NodeSync) -> None:
        return None

    def answer(self, sync: NodeSync) -> None:
        return None

    def sign_again(self, key: Ed25519PrivateKey) -> int:
        return 0

    def artifact_file(self, sha256: str) -> Path | None:
        return None

    def carried(self, sync: NodeSync, members: Mapping[str, bytes]) -> None:
        return None


_features: list[NodeFeature] = []


def register(feature: NodeFeature) -> None:
    """Add ``feature``; called once per feature app, from its ``AppConfig.ready()``."""
    if not feature.name:
        raise ValueError(f"{type(feature).__name__} has no name")
    if any(f.name == feature.name for f in _features):
        raise ValueError(f"a node feature named {feature.name!r} is registered already")
    _features.append(feature)


def node_features() -> tuple[NodeFeature, ...]:
    return tuple(_features)


def artifact_file(sha256: str) -> Path | None:
    """The stored file of the artifact ``sha256``, from whichever feature keeps it; None if none does."""
    for feature in _features:
        path = feature.artifact_file(sha256)
        if path is not None:
            return path
    return None


def desired_content(node: Any, cache: dict[Any, Any]) -> dict[str, Any]:
    """The features' keys of ``node``'s desired state, merged; a key two features claim is an error."""
    content: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for feature in _features:
        for key, value in feature.desired(node, cache).items():
            if key in owners:
                raise ValueError(f"desired-state key {key!r} is claimed by {owners[key]!r} and {feature.name!r}")
            owners[key] = feature.name
            content[key] = value
    return content

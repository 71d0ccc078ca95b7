"""What a feature plugs into the agent with: a :class:`Reconciler`, and what else it may answer for."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.protocol import (
    DesiredState,
    ModelStatus,
    QueryRequest,
)


class Reconciler(Protocol):
    """One feature's part of applying a desired state (models, policy, datasets).

    ``reconcile`` brings the node in line with ``desired`` and returns what
    it now runs, which the node reports as ``actual.detail[name]``. It must
    be safe to call again with the same desired state (it is called on every
    start with the state from disk), and must leave the last good state in
    place when it fails.
    """

    name: str

    async def reconcile(self, desired: DesiredState) -> dict[str, Any]: ...


@runtime_checkable
class ReportsModels(Protocol):
    """A reconciler that also knows what actually serves each model (``actual.models``).

    Asked on every sync rather than only after a reconcile, because what
    serves can change in between (a swap completes, a model fails).
    """

    def model_status(self) -> list[ModelStatus]: ...


@runtime_checkable
class PinsKey(Protocol):
    """A reconciler that verifies signatures with the control plane's key (model artifacts).

    Told of a new key when the node pins one after a key rotation, before it
    reconciles the first state that key signed.
    """

    def pin_key(self, public_key: Ed25519PublicKey) -> None: ...


@runtime_checkable
class AnswersQueries(Protocol):
    """A reconciler that answers federated queries (:class:`edge_runtime.datasets.DatasetService`).

    ``report`` is asked on every sync (its datasets change between desired
    states); ``queries_received`` gets the queries of every successful sync
    answer, an empty list included: a sync that succeeded also says that
    answers waiting for the control plane can go out now.
    ``answers_delivered`` gets the queries whose answers the control plane
    acknowledged in a bundle's receipt: they are not sent again.
    """

    def report(self) -> dict[str, Any]: ...

    def queries_received(self, queries: list[QueryRequest]) -> None: ...

    def answers_delivered(self, query_ids: list[str]) -> None: ...

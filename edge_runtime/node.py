"""One node assembled: the agent, its plug-ins, the model server it feeds, telemetry.

:func:`build_node` wires the parts of an enrolled node together from its
state directory and a :class:`NodeConfig`; :meth:`Node.run` runs them until
the agent stops (SIGTERM or SIGINT) and then closes every part it opened;
:func:`run_node` does both under the state directory's agent lock, so two
agents never share a state directory. What it guarantees:

* a datasets file that cannot be read, or an audit chain that cannot be
  opened, stops the node with its reason (:class:`NodeError`) before the
  model server starts;
* the model server starts before the agent, and answers from whatever the
  last verified desired state loads, so local applications keep their
  inference while the control plane is out of reach;
* telemetry is kept in ``<state dir>/telemetry.sqlite3`` within the
  configured disk budget (see :mod:`edge_runtime.telemetry`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edge_runtime.agent import Agent
from edge_runtime.state import Identity, StateDir
from edge_runtime.telemetry import DEFAULT_BUDGET_BYTES, DEFAULT_INTERVAL_S

if TYPE_CHECKING:
    from edge_runtime.audit import NodeAudit
    from edge_runtime.datasets import DatasetService
    from edge_runtime.models import ModelStore
    from edge_runtime.serving.registry import ModelRegistry
    from edge_runtime.serving.server import ServerHandle
    from edge_runtime.telemetry import TelemetryQueue

logger = logging.getLogger("edge_runtime")

T = TypeVar("T")


class NodeError(Exception):
    """The node cannot start as configured; the message says why."""


@dataclass(frozen=True)
class NodeConfig:
    """How the node runs; the defaults are ``edge-runtime run``'s."""

    # The local inference API; a port of -1 serves no models.
    serve_host: str = "127.0.0.1"
    serve_port: int = 8080
    # 0: chosen for the node (edge_runtime.serving.workers.auto_processes).
    serving_processes: int = 0
    # 0: chosen per model (edge_runtime.serving.loader.auto_instances).
    instances: int = 0
    # None: the model server's own default.
    max_connections: int | None = None
    # Execution providers in order of preference; empty: the best this machine has.
    providers: Sequence[str] = ()
    telemetry_interval_s: float = DEFAULT_INTERVAL_S
    telemetry_budget_bytes: int = DEFAULT_BUDGET_BYTES
    # None: <state dir>/datasets.json (no file there: no datasets).
    datasets: Path | None = None
    query_workers: int = 2
    # Never dial the control plane (an air-gapped site): bundles only.
    offline: bool = False
    # Bundles copied here are imported by the agent itself.
    drop_folder: Path | None = None
    # "explicit": clients may unload and load again what the node was asked to serve (the repository API).
    model_control: str = "none"


@dataclass
class Node:
    """The parts of one running node; :meth:`run` owns them from the moment it is called."""

    agent: Agent
    registry: ModelRegistry
    store: ModelStore
    datasets: DatasetService
    queue: TelemetryQueue
    server: ServerHandle | None

    async def run(self) -> None:
        """Run the agent until it stops, then close every part, also when the agent fails."""
        try:
            await self.agent.run()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self.datasets.aclose()
        self.queue.close()
        if self.server is not None:
            await self.server.stop()
        await self.store.aclose()
        await self.registry.close()


async def build_node(state: StateDir, config: NodeConfig) -> Node:
    """The node of ``state``'s identity, its model server already listening (unless the port is -1).

    Raises :class:`NodeError` for a configuration the node cannot run with,
    ``StateError`` for a state directory without a usable identity, and
    ``OSError`` when the model server cannot listen.
    """
    from edge_runtime.audit import AuditError, NodeAudit
    from edge_runtime.models import ModelService, ModelStore
    from edge_runtime.serving.metrics import read_series
    from edge_runtime.serving.registry import ModelRegistry
    from edge_runtime.serving.workers import cpu_share, resolve_processes
    from edge_runtime.telemetry import QUEUE_FILE, Telemetry, TelemetryQueue

    identity = state.load_identity()
    # A node given its providers uses those and no other (``--providers CPUExecutionProvider`` forces CPU).
    options: dict[str, Any] = ({"provider_priority": list(config.providers), "providers_only": list(config.providers)}
                               if config.providers else {})
    try:
        processes = (resolve_processes(config.serving_processes, providers=config.providers)
                     if config.serve_port >= 0 else 1)
    except ValueError as exc:
        raise NodeError(str(exc)) from exc
    try:
        # One log for the agent and every plug-in that writes to it.
        audit = NodeAudit.in_state_dir(state.path)
    except AuditError as exc:
        raise NodeError(str(exc)) from exc
    registry = ModelRegistry(instances=config.instances, cpus=cpu_share(processes), **options)
    store = ModelStore(registry=registry, state_dir=state.path, base_url=identity.url,
                       node_id=identity.node_id, credential=identity.credential,
                       public_key=identity.signing_public_key, audit=audit)
    # Before the server starts: a datasets file that cannot be read stops the node with its reason.
    datasets = dataset_service(state, identity, config, registry, audit)
    server = await _start_server(registry, config, processes)
    queue = TelemetryQueue(state.path / QUEUE_FILE, budget_bytes=config.telemetry_budget_bytes)
    telemetry = Telemetry(queue, interval_s=config.telemetry_interval_s,
                          read_models=lambda: read_series(registry.metrics), disk_path=state.path)
    agent = Agent(state, reconcilers=[ModelService(store), datasets], telemetry=telemetry, audit=audit,
                  offline=config.offline)
    agent.drop_folder = config.drop_folder
    agent.status.model_server_url = server.url if server is not None else ""
    return Node(agent=agent, registry=registry, store=store, datasets=datasets, queue=queue, server=server)


async def _start_server(registry: ModelRegistry, config: NodeConfig, processes: int) -> ServerHandle | None:
    if config.serve_port < 0:
        return None
    from edge_runtime.serving.server import run_server

    limits: dict[str, Any] = {"max_connections": config.max_connections} if config.max_connections else {}
    handle = await run_server(registry, config.serve_host, config.serve_port, processes=processes,
                              model_control=config.model_control, **limits)
    logger.info("model server listening on %s (%d serving process%s)", handle.url,
                processes, "" if processes == 1 else "es")
    return handle


def dataset_service(state: StateDir, identity: Identity, config: NodeConfig, registry: Any,
                    audit: NodeAudit) -> DatasetService:
    """The node's ``datasets`` plug-in: its datasets, the node's audit log, its model server as scorer."""
    from edge_runtime.data.catalog import DATASETS_FILE, Catalog, CatalogError
    from edge_runtime.data.node import registry_scorer
    from edge_runtime.datasets import DatasetService

    try:
        if config.datasets is None:
            catalog = Catalog.from_state_dir(state.path)
            where = state.path / DATASETS_FILE
        else:
            catalog = Catalog.from_file(config.datasets)
            where = config.datasets
    except CatalogError as exc:
        raise NodeError(str(exc)) from exc
    logger.info("datasets: %s (from %s)", ", ".join(catalog.names()) or "none", where)
    return DatasetService(state_dir=state.path, catalog=catalog, audit=audit, base_url=identity.url,
                          node_id=identity.node_id, credential=identity.credential, site=identity.site,
                          scorer=registry_scorer(registry), workers=config.query_workers, offline=config.offline)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (the model server's HTTP is faster on it), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_node(state: StateDir, config: NodeConfig) -> None:
    """Build and run the node of ``state`` until SIGTERM or SIGINT, holding the state directory's agent lock.

    Raises what :func:`build_node` raises, and ``StateError`` when another agent holds the lock.
    """

    async def main() -> None:
        node = await build_node(state, config)
        await node.run()

    with state.agent_lock():
        run_loop(main())

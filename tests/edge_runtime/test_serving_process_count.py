"""How many processes a node serves from when it does not say: accelerators, and a node forced to CPU."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge_runtime import signing
from edge_runtime.node import NodeConfig, build_node
from edge_runtime.serving import workers
from edge_runtime.state import StateDir
from tests.edge_runtime.factories import identity_for

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
CPUS = 8


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A Linux machine with 8 usable CPUs and memory to spare; the test fills in onnxruntime's providers."""
    providers: list[str] = []
    monkeypatch.setattr(workers, "available_providers", lambda: list(providers))
    monkeypatch.setattr(workers, "reuse_port_supported", lambda: True)
    monkeypatch.setattr(workers, "usable_cpus", lambda: CPUS)
    monkeypatch.setattr(workers.os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 4 * 1024**2)
    return providers


def test_it_serves_a_cpu_only_node_from_one_process_per_cpu_up_to_the_cap(machine: list[str]) -> None:
    machine += [CPU, "AzureExecutionProvider"]
    assert workers.resolve_processes(0) == workers.MAX_AUTO_PROCESSES


@pytest.mark.parametrize("accelerator", [CUDA, OPENVINO])
def test_it_serves_a_node_with_an_accelerator_from_one_process(machine: list[str], accelerator: str) -> None:
    machine += [accelerator, CPU]
    assert workers.resolve_processes(0) == 1
    # The accelerator on the node's own list still counts.
    assert workers.resolve_processes(0, providers=[accelerator, CPU]) == 1


def test_it_gives_a_node_forced_to_cpu_the_cpu_count(machine: list[str]) -> None:
    machine += ["TensorrtExecutionProvider", CUDA, CPU]
    assert workers.resolve_processes(0, providers=[CPU]) == workers.MAX_AUTO_PROCESSES
    # An accelerator this build lacks changes nothing either.
    assert workers.resolve_processes(0, providers=["ROCMExecutionProvider", CPU]) == workers.MAX_AUTO_PROCESSES


def test_it_keeps_a_count_the_node_asked_for(machine: list[str]) -> None:
    machine += [CUDA, CPU]
    assert workers.resolve_processes(3, providers=[CPU]) == 3
    assert workers.resolve_processes(3) == 3


def test_a_node_run_with_cpu_only_serves_from_the_cpu_count(
    machine: list[str], tmp_path: Path
) -> None:
    machine += [CUDA, CPU]
    state = StateDir(tmp_path / "node")
    state.save_identity(identity_for(signing.generate_private_key()))

    async def build(providers: tuple[str, ...]) -> tuple[int, int]:
        node = await build_node(state, NodeConfig(serve_port=0, providers=providers))
        try:
            assert node.server is not None
            pool = node.server.pool
            # The pool's workers start only once a model serves: none runs here.
            return (len(pool.workers) + 1 if pool is not None else 1), node.registry.cpus
        finally:
            await node.aclose()

    assert asyncio.run(build((CPU,))) == (workers.MAX_AUTO_PROCESSES, CPUS // workers.MAX_AUTO_PROCESSES)
    assert asyncio.run(build(())) == (1, 0)

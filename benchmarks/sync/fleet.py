"""Simulated nodes that speak agent protocol v1 exactly as a node does.

A ``SimNode`` enrolls with the site token, pins the signing key from the
enrollment answer, and syncs with full ``SyncRequest`` bodies (hardware,
actual state with its applied generation, health). When a ``SyncResponse``
carries a desired state the node verifies its signature with the pinned key
and that it is addressed to itself before adopting its generation, so the
next sync reports it and the control plane stops sending it. Anything a real
node would refuse raises ``RequestFailed``.

Many nodes share one ``httpx.AsyncClient`` (one connection pool); each node
has at most one request in flight, as a real node does.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from benchmarks.loadgen import RequestFailed
from edge_runtime import protocol, signing

RUNTIME_VERSION = "0.1.0-bench"
JSON = {"Content-Type": "application/json"}


def node_hardware(index: int) -> protocol.Hardware:
    """A plausible, stable hardware profile: a mix of small devices, gateways and GPU servers."""
    rng = random.Random(index)
    kind = rng.choice(["device", "device", "device", "gateway", "server"])
    if kind == "server":
        return protocol.Hardware(
            cpu_model="AMD EPYC 7313P 16-Core Processor", cpu_cores=32, memory_mb=rng.choice([131072, 262144]),
            accelerators=["NVIDIA L4"], execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
            os="Linux 6.1.0-18-amd64", arch="x86_64", hostname=f"srv-{index:05d}",
        )
    if kind == "gateway":
        return protocol.Hardware(
            cpu_model="Intel(R) Core(TM) i5-1145G7E", cpu_cores=8, memory_mb=16384,
            execution_providers=["OpenVINOExecutionProvider", "CPUExecutionProvider"],
            os="Linux 6.1.0-18-amd64", arch="x86_64", hostname=f"gw-{index:05d}",
        )
    return protocol.Hardware(
        cpu_model="Cortex-A76", cpu_cores=4, memory_mb=rng.choice([4096, 8192]),
        execution_providers=["CPUExecutionProvider"], os="Linux 6.6.31+rpt-rpi-v8", arch="aarch64",
        hostname=f"dev-{index:05d}",
    )


@dataclass
class SimNode:
    index: int
    hardware: protocol.Hardware
    node_id: str = ""
    credential: str = ""
    fingerprint: str = ""
    public_key: Ed25519PublicKey | None = None
    applied_generation: int = 0
    applied_epoch: str = ""
    started: float = field(default_factory=time.monotonic)
    syncs: int = 0
    desired_received: int = 0
    # The digest of this node's report the control plane said it holds: while it matches, syncs are brief.
    held_digest: str | None = None
    quiet_answers: int = 0
    _digest: tuple[int, str] = (-1, "")

    @property
    def name(self) -> str:
        return f"bench-node-{self.index:05d}"

    def identity(self) -> dict[str, Any]:
        """What another load-generator process needs to go on syncing as this node (:meth:`from_identity`)."""
        assert self.public_key is not None, "enroll first"
        raw = self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"index": self.index, "node_id": self.node_id, "credential": self.credential,
                "fingerprint": self.fingerprint, "public_key": base64.b64encode(raw).decode(),
                "applied_generation": self.applied_generation, "applied_epoch": self.applied_epoch,
                "held_digest": self.held_digest}

    @classmethod
    def from_identity(cls, held: dict[str, Any]) -> SimNode:
        node = cls(index=held["index"], hardware=node_hardware(held["index"]), node_id=held["node_id"],
                   credential=held["credential"], fingerprint=held["fingerprint"],
                   public_key=signing.public_key_from_b64(held["public_key"]),
                   applied_generation=held["applied_generation"], applied_epoch=held["applied_epoch"],
                   held_digest=held["held_digest"])
        node.desired_received = 1  # settled: its first desired state came before it was handed over
        return node

    @property
    def role(self) -> protocol.NodeRole:
        host = self.hardware.hostname
        return "server" if host.startswith("srv") else "gateway" if host.startswith("gw") else "device"

    async def enroll(self, client: httpx.AsyncClient, token: str) -> None:
        body = protocol.EnrollRequest(token=token, name=self.name, role=self.role, runtime_version=RUNTIME_VERSION,
                                      hardware=self.hardware)
        resp = await client.post(f"{protocol.API_PREFIX}/enroll", content=body.model_dump_json(), headers=JSON)
        if resp.status_code != 201:
            raise RequestFailed(f"enroll {resp.status_code}", resp.text[:300])
        try:
            answer = protocol.EnrollResponse.model_validate_json(resp.content)
            key = signing.public_key_from_b64(answer.signing_public_key)
        except (ValidationError, signing.SignatureError) as exc:
            raise RequestFailed("enroll answer invalid", str(exc)[:300]) from exc
        # Pin the key only if it is the one the answer names, as the installer's fingerprint check does.
        raw = base64.b64decode(answer.signing_public_key)
        if signing.fingerprint(raw) != answer.signing_key_fingerprint:
            raise RequestFailed("enroll key fingerprint mismatch")
        self.node_id, self.credential = answer.node_id, answer.credential
        self.public_key, self.fingerprint = key, answer.signing_key_fingerprint

    def report(self) -> protocol.SyncRequest:
        return protocol.SyncRequest(
            runtime_version=RUNTIME_VERSION,
            hardware=self.hardware,
            actual=protocol.ActualState(
                applied_generation=self.applied_generation, applied_epoch=self.applied_epoch,
                detail={"models": []},
            ),
            health=self.health(),
        )

    def health(self) -> protocol.Health:
        return protocol.Health(status="ok", uptime_s=round(time.monotonic() - self.started, 3))

    def digest(self) -> str:
        """The digest of this node's report (which changes only with its applied generation), as a node has it."""
        if self._digest[0] != self.applied_generation:
            self._digest = (self.applied_generation, protocol.report_digest(self.report()))
        return self._digest[1]

    def sync_body(self) -> bytes:
        """A brief sync while the control plane holds this report, as the edge runtime sends; else the whole."""
        if self.held_digest is not None and self.held_digest == self.digest():
            brief = protocol.SyncRequest(
                brief=True, digest=self.held_digest, health=self.health(),
                actual=protocol.ActualState(applied_generation=self.applied_generation,
                                            applied_epoch=self.applied_epoch))
            return brief.model_dump_json(exclude_defaults=True).encode()
        return self.report().model_copy(update={"digest": self.digest()}).model_dump_json().encode()

    async def sync(self, client: httpx.AsyncClient) -> None:
        resp = await client.post(
            f"{protocol.API_PREFIX}/nodes/{self.node_id}/sync", content=self.sync_body(),
            headers={**JSON, "Authorization": f"Bearer {self.credential}"},
        )
        if resp.status_code != 200:
            raise RequestFailed(f"sync {resp.status_code}", resp.text[:300])
        try:
            answer = protocol.SyncResponse.model_validate_json(resp.content)
        except ValidationError as exc:
            raise RequestFailed("sync answer invalid", str(exc)[:300]) from exc
        self.held_digest = answer.report_digest
        if answer.report_wanted:
            # Not held (any more): the whole report at once, as the edge runtime does.
            return await self.sync(client)
        self.syncs += 1
        self.quiet_answers += resp.headers.get(protocol.SYNC_PATH_HEADER) == "quiet"
        if answer.desired is not None:
            self.adopt(answer.desired)

    def adopt(self, signed: protocol.SignedDesiredState) -> None:
        assert self.public_key is not None, "enroll first"
        if signed.key_fingerprint != self.fingerprint:
            raise RequestFailed("desired state signed by another key")
        try:
            state = signing.verify_desired_state(signed, self.public_key)
        except signing.SignatureError as exc:
            raise RequestFailed("desired state signature", str(exc)) from exc
        if state.node_id != self.node_id:
            raise RequestFailed("desired state for another node", state.node_id)
        self.applied_generation, self.applied_epoch = state.generation, state.epoch
        self.desired_received += 1


class Fleet:
    """The simulated nodes; ``sync_next`` syncs the node whose turn it is."""

    def __init__(self, size: int = 0, nodes: list[SimNode] | None = None) -> None:
        self.nodes = nodes if nodes is not None else [SimNode(index=i, hardware=node_hardware(i))
                                                      for i in range(size)]
        # Idle nodes in turn order: a node goes to the back after its sync, so
        # with fewer requests in flight than nodes every node syncs in turn
        # and none ever has two syncs outstanding.
        self._idle: asyncio.Queue[SimNode] = asyncio.Queue()
        for node in self.nodes:
            self._idle.put_nowait(node)

    async def sync_next(self, client: httpx.AsyncClient) -> None:
        node = await self._idle.get()
        try:
            await node.sync(client)
        finally:
            self._idle.put_nowait(node)

    def quiet_answers(self) -> int:
        return sum(n.quiet_answers for n in self.nodes)

    def desired_received(self) -> int:
        return sum(n.desired_received for n in self.nodes)

    def syncs(self) -> int:
        return sum(n.syncs for n in self.nodes)

"""The benchmark's work inside the control plane (run with ``manage.py shell -c``; Django is set up).

``setup`` builds the simulated fleet: the hardware profiles of the sync
benchmark's simulator (``benchmarks.sync.fleet.node_hardware``), spread over
sites in several regions and jurisdictions, every node online and on version
1.0.0 of a model (its desired state as a deployment publishes it, written in
bulk because setup is not what is measured).
``measure`` times, in one process and on the same rows, loading the nodes
(the baseline), planning a rollout of 2.0.0 over all of them, and publishing
its first wave.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from typing import Any

from django.utils import timezone

from audit.services import Actor
from benchmarks.sync.fleet import node_hardware
from edge_runtime import protocol, signing
from orchestrator import keys

ACTOR = Actor.system("benchmark")
JURISDICTIONS = ["DE", "FR", "US", "JP"]


def _version(model: Any, label: str) -> Any:
    from models_registry.models import ModelVersion, VersionStatus

    sha = hashlib.sha256(f"benchmark {label}".encode()).hexdigest()
    return ModelVersion.objects.create(
        model=model, version=label, sha256=sha, size=1_000_000, status=VersionStatus.VALID,
        signature=signing.sign_artifact(sha, keys.signing_key()),
        signature_inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 32]}])


def setup(nodes: int, sites: int) -> dict[str, Any]:
    from models_registry.models import Deployment, Model
    from orchestrator.desired_state import desired_state_content
    from orchestrator.models import DesiredState
    from policies import services as policy_services
    from policies.selectors import placement_policy_pinned
    from sites import services
    from sites.models import Node, NodeRole, Site
    from sites.services import CREDENTIAL_PREFIX, secret_hash

    started = time.perf_counter()
    regions = [services.region_create(actor=ACTOR, slug=f"region-{i}", name=f"Region {i}") for i in range(4)]
    site_rows = [Site.objects.create(region=regions[i % 4], slug=f"site-{i:04d}", name=f"Site {i}",
                                     jurisdiction=JURISDICTIONS[i % 4], clearance=2 + (i % 2),
                                     labels={"tier": "gold" if i % 3 == 0 else "silver"})
                 for i in range(sites)]
    # A placement rule that keeps the model out of one jurisdiction, so the plan has exclusions to
    # list; written before the nodes exist, else it would publish their desired states one by one.
    policy_services.policy_update(actor=ACTOR, kind="placement", document={"rules": [
        {"name": "not-in-japan", "effect": "deny", "classifications": [2], "where": {"jurisdictions": ["JP"]}}]})
    now = timezone.now()
    rows = []
    for index in range(nodes):
        hardware = node_hardware(index)
        host = hardware.hostname
        role = NodeRole.SERVER if host.startswith("srv") else NodeRole.GATEWAY if host.startswith("gw") \
            else NodeRole.DEVICE
        rows.append(Node(site=site_rows[index % sites], name=f"bench-node-{index:05d}", role=role,
                         credential_hash=secret_hash(f"{CREDENTIAL_PREFIX}bench-{index}"),
                         hardware=hardware.model_dump(mode="json"), runtime_version="0.1.0-bench",
                         last_seen_at=now, status="online"))
    Node.objects.bulk_create(rows, batch_size=2000)
    model = Model.objects.create(slug="bench-model", name="Benchmark model", classification=2)
    v1, v2 = _version(model, "1.0.0"), _version(model, "2.0.0")
    Deployment.objects.bulk_create([Deployment(version=v1, site=site) for site in site_rows])
    # The desired states a deployment would have published, written in bulk: setup is not what is measured.
    trust = keys.current()
    states = []
    with placement_policy_pinned():
        for node in Node.objects.select_related("site__region"):
            content = {**desired_state_content(node), "epoch": trust.epoch, "epoch_started_at": trust.epoch_started_at}
            content_hash = hashlib.sha256(signing.canonical_json(content).encode()).hexdigest()
            signed = signing.sign_desired_state(
                protocol.DesiredState(generation=1, issued_at=now, **content), trust.key)
            states.append(DesiredState(node=node, generation=1, content_hash=content_hash, payload=signed.payload,
                                       signature=signed.signature, key_fingerprint=signed.key_fingerprint,
                                       epoch=trust.epoch, published_at=now))
    DesiredState.objects.bulk_create(states, batch_size=1000)
    _applied_report(trust.epoch)
    return {"nodes": nodes, "sites": sites, "version": str(v2.uuid), "setup_s": round(time.perf_counter() - started, 2)}


def _applied_report(epoch: int) -> None:
    """Every node reports it applied its desired state and serves 1.0.0."""
    from sites.models import Node

    reported = list(Node.objects.select_related("desired"))
    for node in reported:
        node.applied_generation = node.desired.generation
        node.actual_state = {"applied_generation": node.applied_generation, "applied_epoch": epoch, "models": [
            {"name": "bench-model", "version": "1.0.0", "state": "serving", "variant": "original"}]}
    Node.objects.bulk_update(reported, ["applied_generation", "actual_state"], batch_size=2000)


def _load_nodes() -> int:
    from sites.models import Node

    # What planning itself reads: every active node with its site and region.
    return len(list(Node.objects.filter(revoked_at__isnull=True).select_related("site__region")))


def measure(version_uuid: str, wave: int, repeats: int) -> dict[str, Any]:
    from models_registry.models import ModelVersion
    from rollouts import engine, services
    from rollouts.models import NodeState, Rollout

    version = ModelVersion.objects.select_related("model").get(uuid=version_uuid)
    _load_nodes()  # warm: connections, caches, imports
    baseline = []
    for _ in range(repeats):
        started = time.perf_counter()
        loaded = _load_nodes()
        baseline.append(time.perf_counter() - started)
    started = time.perf_counter()
    rollout = services.rollout_create(actor=ACTOR, user=None, version=version, target={},
                                      strategy={"canary_nodes": wave, "percentages": [25, 50, 100], "gate": None})
    planned = time.perf_counter()
    services.rollout_start(actor=ACTOR, rollout=rollout)
    engine.rollout_advance(rollout_id=rollout.pk)
    published = time.perf_counter()
    rollout = Rollout.objects.get(pk=rollout.pk)
    switched = rollout.nodes.filter(state=NodeState.UPDATING).count()
    excluded = len(rollout.plan["excluded"])
    check = rollout.nodes.filter(state=NodeState.UPDATING).select_related("node__desired")[:50]
    carries = all(any(m["version"] == "2.0.0" for m in json.loads(r.node.desired.payload)["models"]) for r in check)
    return {
        "nodes_loaded": loaded,
        "baseline_load_s": [round(x, 4) for x in baseline],
        "baseline_load_median_s": round(statistics.median(baseline), 4),
        "plan_s": round(planned - started, 4),
        "publish_wave_s": round(published - planned, 4),
        "plan_and_publish_s": round(published - started, 4),
        "planned_nodes": rollout.nodes.count(),
        "excluded_nodes": excluded,
        "waves": [len(w) for w in rollout.plan["waves"]],
        "wave_published_nodes": switched,
        "wave_carries_new_version": carries,
    }

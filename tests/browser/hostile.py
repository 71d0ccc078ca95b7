"""A hostile estate for the browser tests: every free-text value carries a script payload.

Region and site names, a jurisdiction, labels, a model's name and
description, a token note, a policy comment, an approver's comment, and
everything a hostile node reports through the agent API (hardware strings,
runtime version, health message, a model's error and provider, a dataset's
description, a refusal, the group keys of a query answer, the rule, field and
reason of a refused one). Each payload calls ``xss()`` if it ever runs: an
attribute breakout with ``"`` or ``'`` that adds an ``onanimationstart``
handler and a style that starts an animation (it fires with no click),
``<img onerror>``, ``<script>``, ``<svg onload>`` and ``javascript:`` links.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import httpx

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime.data.engine import spec_digest
from edge_runtime.protocol import ActualState, Hardware, Health, ModelStatus, SyncRequest
from models_registry import services as registry
from models_registry.models import ModelVersion
from policies import services as policy_services
from queries.models import FederatedQuery
from queries.services.lifecycle import query_create
from rollouts import services as rollouts
from rollouts.models import Rollout
from sites import services
from sites.models import Node, Site
from tests.fixtures.personas import make_region, make_site, make_user
from tests.fixtures.processes import ControlPlane
from tests.models_registry import onnx_factory

ACTOR = Actor.system("test")


def breakout(tag: str, quote: str = '"', *, reopen: bool = True) -> str:
    """Closes the attribute it is put into (quoted with ``quote``) and adds a handler that fires by itself;
    ``reopen`` opens another attribute for the rest of the original one (short fields do without)."""
    q = quote
    handler = f"{tag}{q} onanimationstart={q}xss(`{tag}`){q} style={q}animation:pulse 1s{q}"
    return handler + (f" x={q}" if reopen else "")


def markup(tag: str) -> str:
    """Elements that run script if the value is ever put into a page as HTML."""
    return f"{tag}<img src=x onerror=xss(`{tag}`)><script>xss(`{tag}`)</script>"


def link(tag: str) -> str:
    return f"javascript:xss(`{tag}`)"


@dataclass
class Estate:
    """What was created, and the values each console page must show as text."""

    site: Site
    second: Site
    unplaced: Site
    node: Node
    model_slug: str
    rejected: Rollout
    pending: Rollout
    query: FederatedQuery
    refused: FederatedQuery
    values: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> str:
        return self.values[key]


def hostile_estate(cp: ControlPlane) -> Estate:
    """A region, sites, a node that enrolled and synced over HTTP, a model, rollouts, a query: all hostile."""
    v: dict[str, str] = {
        "region": breakout("region", "'"),
        "other_region": markup("region2"),
        "site": breakout("site", '"'),
        "second": markup("site2"),
        "unplaced": breakout("unplaced", "'"),
        "jurisdiction": "<svg onload=xss(9)>",
        "label_key": markup("label-key"),
        "label_value": breakout("label", '"'),
        "cpu": markup("cpu"),
        "os": breakout("os", '"'),
        "arch": "<svg onload=xss(`arch`)>",
        "hostname": breakout("hostname", "'"),
        "accelerator": markup("accelerator"),
        "accelerator_link": link("accelerator"),
        "provider": breakout("ep", '"'),
        "runtime": "<svg onload=xss(`runtime`)>",
        "health": markup("health") + " " + breakout("health", '"'),
        "model_error": markup("model-error") + " " + link("model-error"),
        "serving_provider": breakout("sp", '"', reopen=False),
        "dataset": markup("dataset"),
        "refusal": markup("refusal"),
        "model": breakout("model", '"'),
        "description": markup("description"),
        "policy_comment": markup("policy") + " " + breakout("policy", "'"),
        "decision": markup("decision") + " " + breakout("decision", '"'),
        "token_note": markup("token-note"),
        "group": breakout("group", '"'),
        "group2": markup("group2"),
        "query_reason": markup("query-reason"),
        "query_rule": "<svg onload=xss(`rule`)>",  # the control plane keeps 40 characters of a rule
        "query_field": breakout("query-field", "'"),
    }
    eu, us = make_region("eu", v["region"]), make_region("us", v["other_region"])
    site = make_site(eu, "plant-berlin", name=v["site"], jurisdiction=v["jurisdiction"], latitude=52.5,
                     longitude=13.4, labels={v["label_key"]: v["label_value"]})
    second = make_site(us, "plant-ohio", name=v["second"], latitude=40.0, longitude=-83.0)
    unplaced = make_site(eu, "store-unplaced", name=v["unplaced"], latitude=None, longitude=None)
    ada = make_user("ada", superuser=True)
    bob = make_user("bob", superuser=True)

    model = registry.model_create(actor=ACTOR, slug="defects", name=v["model"],
                                  description=v["description"] + "\nsecond line")
    uploaded = registry.model_version_upload(actor=ACTOR, model=model, version="1.0.0",
                                             file=io.BytesIO(onnx_factory.linear(seed=3)))
    version = registry.model_version_validate(version_id=uploaded.pk)
    assert isinstance(version, ModelVersion) and version.status == "valid", version and version.validation_log

    # The node enrolls and syncs through the agent API, as a hostile edge runtime would.
    _, token = services.token_create(actor=ACTOR, site=site, note=v["token_note"])
    hardware = Hardware(cpu_model=v["cpu"], cpu_cores=8, memory_mb=16384, os=v["os"], arch=v["arch"],
                        hostname=v["hostname"], accelerators=[v["accelerator"], v["accelerator_link"]],
                        execution_providers=[v["provider"], "CPUExecutionProvider"])
    enrolled = httpx.post(f"{cp.url}/agent/v1/enroll", timeout=10, json={
        "token": token, "name": "gw-1", "role": "gateway", "runtime_version": v["runtime"],
        "hardware": hardware.model_dump(mode="json")})
    assert enrolled.status_code == 201, enrolled.text
    node = Node.objects.get(uuid=enrolled.json()["node_id"])
    registry.deployment_create(actor=ACTOR, version=version, sites=[site])
    node.refresh_from_db()
    report = SyncRequest(
        runtime_version=v["runtime"],
        actual=ActualState(
            applied_generation=node.desired.generation,
            models=[ModelStatus(name="defects", version="1.0.0", state="failed", error=v["model_error"],
                                provider=v["serving_provider"])],
            detail={"datasets": {"datasets": [{
                "name": "readings", "kind": "csv", "row_count": 10, "description": v["dataset"],
                "columns": [{"name": "line", "type": "string"}, {"name": "temperature", "type": "float"}]}]}},
        ),
        health=Health(status="degraded", uptime_s=60, message=v["health"]),
        refusals=[{"generation": 1, "reason": v["refusal"], "at": "2026-01-01T00:00:00Z"}],
    )
    agent = httpx.Client(base_url=f"{cp.url}/agent/v1/nodes/{node.uuid}", timeout=10,
                         headers={"Authorization": f"Bearer {enrolled.json()['credential']}"})
    synced = agent.post("/sync", json=report.model_dump(mode="json"))
    assert synced.status_code == 200, synced.text

    # Two queries: one the node answers with hostile group keys (the merged table and its chart show
    # them), one it refuses naming a hostile rule and field with a hostile reason.
    policy_services.policy_update(actor=ACTOR, kind="data", document={
        "default": {"datasets": {"readings": {}}, "min_group_size": 1}})
    query = query_create(actor=Actor.user(ada), user=ada, sites=[site],
                         spec={"dataset": "readings", "group_by": ["line"], "aggregates": [{"op": "count"}]})
    refused = query_create(actor=Actor.user(ada), user=ada, sites=[site],
                           spec={"dataset": "readings", "aggregates": [{"op": "count"}]})
    answers = [
        (query, {"status": "answered", "rows_scanned": 10, "spec_digest": spec_digest(query.spec), "partials": {
            "key_names": ["line"], "key_types": ["string"], "keys": [[v["group"], v["group2"]]], "rows": [4, 6],
            "aggregates": [{"name": "count", "op": "count", "n": [4, 6]}]}}),
        (refused, {"status": "refused", "reason": v["query_reason"], "rule": v["query_rule"],
                   "field": v["query_field"]}),
    ]
    for asked, answer in answers:
        posted = agent.post(f"/queries/{asked.uuid}/result", json={"query_id": str(asked.uuid), **answer})
        assert posted.status_code == 201, posted.text
    agent.close()
    policy_services.policy_update(actor=ACTOR, kind="rollout", comment=v["policy_comment"], document={
        "approval_rules": [{"name": "eu-needs-review", "regions": ["eu"], "approvals": 1, "role": "Approver"}]})
    rejected = rollouts.rollout_create(actor=Actor.user(bob), user=bob, version=version,
                                       target={"sites": [site.slug]}, strategy={"gate": None})
    rejected = rollouts.rollout_reject(actor=Actor.user(ada), user=ada, rollout=rejected,
                                       plan_hash=rejected.plan_hash, comment=v["decision"])
    pending = rollouts.rollout_create(actor=Actor.user(bob), user=bob, version=version,
                                      target={"sites": [site.slug]}, strategy={"gate": None})
    assert pending.state == "pending_approval", pending.state
    return Estate(site=site, second=second, unplaced=unplaced, node=node, model_slug=model.slug,
                  rejected=rejected, pending=pending, query=query, refused=refused, values=v)


def console_pages(estate: Estate) -> list[tuple[str, list[str]]]:
    """Every console page, with the hostile values it shows as text."""
    v = estate
    site_event = AuditEvent.objects.get(action="site.create", object_repr=estate["second"])
    enroll_event = AuditEvent.objects.get(action="node.enroll", object_id=str(estate.node.uuid))
    return [
        ("/", [v["site"], v["second"], v["unplaced"], v["region"], v["other_region"], v["jurisdiction"]]),
        (f"/sites/{estate.site.slug}/", [v["site"], v["region"], v["jurisdiction"],
                                         f"{v['label_key']}={v['label_value']}", v["runtime"], v["token_note"]]),
        (f"/nodes/{estate.node.uuid}/", [v["site"], v["region"], v["cpu"], v["os"], v["arch"], v["hostname"],
                                         f"{v['accelerator']}, {v['accelerator_link']}", v["provider"],
                                         v["health"], v["model_error"], v["serving_provider"], v["runtime"]]),
        ("/models/", [v["model"]]),
        ("/models/new", []),
        (f"/models/{estate.model_slug}/", [v["model"], v["description"], v["site"], v["model_error"],
                                           v["serving_provider"]]),
        ("/rollouts/", []),
        (f"/rollouts/{estate.rejected.uuid}/", [v["site"], v["decision"]]),
        (f"/rollouts/{estate.pending.uuid}/", [v["site"]]),
        ("/rollouts/new", [v["site"], v["second"], v["unplaced"]]),
        ("/approvals/", [v["decision"]]),
        ("/policies/", []),
        ("/policies/rollout/", [v["policy_comment"]]),
        ("/queries/", []),
        ("/queries/new", [v["dataset"]]),
        ("/queries/new?dataset=readings", [v["dataset"]]),
        (f"/queries/{estate.query.uuid}/", [v["site"], v["group"], v["group2"]]),
        (f"/queries/{estate.refused.uuid}/", [v["site"], v["query_reason"], v["query_rule"], v["query_field"]]),
        ("/audit/", []),
        ("/audit/?action=site.create", [v["site"], v["second"], v["unplaced"]]),
        (f"/audit/{site_event.uuid}/", [v["second"]]),
        (f"/audit/{enroll_event.uuid}/", [v["cpu"], v["accelerator"], v["arch"]]),
    ]

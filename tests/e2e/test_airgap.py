"""An air-gapped node: models and policy reach it by bundle only, and every bad bundle is refused while it serves."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import signing
from edge_runtime.airgap.bundle import BundleRefused, read_metadata
from edge_runtime.airgap.inbound import import_bundle
from edge_runtime.airgap.writing import Source, write_bundle
from edge_runtime.audit import NodeAudit
from edge_runtime.state import StateDir
from models_registry import services as registry
from sites import services
from sites.bundles import bundle_export
from sites.models import ExpiredBundles, Region, Site, SiteBundle
from tests.fixtures.personas import make_site
from tests.fixtures.processes import EdgeNode, wait_until
from tests.models_registry import onnx_factory
from tests.models_registry.helpers import make_model, valid_version

pytestmark = [pytest.mark.process, pytest.mark.django_db(transaction=True)]

ACTOR = Actor.system("test")


@pytest.fixture
def site_base7(region_eu: Region) -> Site:
    return make_site(region_eu, "base-7", name="Base 7", jurisdiction="DE", connectivity="air_gapped")


def offline_node(edge_node: Callable[..., EdgeNode], site: Site, name: str, tmp_path: Path) -> EdgeNode:
    """A node enrolled at the depot, then run with no route to the control plane: bundles in its drop folder only."""
    node = edge_node(site, name, role="server", start=False)
    node.args = ["--offline", "--drop-folder", str(tmp_path / f"{name}-drop")]
    node.start()
    wait_until(lambda: node.status()["model_server_url"], what=f"the node's model server\n{node.log_text()}")
    return node


def export(site: Site, tmp_path: Path, name: str, **options: Any) -> Path:
    path = tmp_path / name
    bundle_export(actor=ACTOR, site=site, path=path, **options)
    return path


def model_version(url: str, model: str) -> str | None:
    rows = np.zeros((1, 32), dtype=np.float32)
    body = {"inputs": [{"name": "x", "shape": [1, 32], "datatype": "FP32", "data": rows.ravel().tolist()}]}
    try:
        response = httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=10)
    except httpx.HTTPError:
        return None
    return str(response.json()["model_version"]) if response.status_code == 200 else None


def refused(node: EdgeNode, path: Path) -> str:
    result = node.cli("import-bundle", str(path), "--state-dir", str(node.state_dir), check=False)
    assert result.returncode == 1, result.stdout
    return result.stderr


def test_an_offline_node_gets_models_and_policy_by_bundle_only_and_refuses_every_bad_bundle_while_serving(
    edge_node: Callable[..., EdgeNode], site_base7: Site, site_berlin: Site, tmp_path: Path
) -> None:
    node = offline_node(edge_node, site_base7, "s-1", tmp_path)
    url = node.status()["model_server_url"]
    model = make_model("sonar")
    v1 = valid_version(model, onnx_factory.linear(seed=1), version="1.0.0")
    registry.deployment_create(actor=ACTOR, version=v1, sites=[site_base7])

    first = export(site_base7, tmp_path, "in-1.ewb")
    row = SiteBundle.objects.get(site=site_base7, direction="in")
    assert row.sequence == 1 and row.summary["artifacts"] == 1 and row.summary["nodes"] == 1
    assert AuditEvent.objects.filter(action="bundle.export", after__sequence=1).count() == 1
    out = node.cli("import-bundle", str(first), "--state-dir", str(node.state_dir))
    assert "bundle 1 for site base-7" in out.stdout and "1 artifact(s)" in out.stdout
    wait_until(lambda: model_version(url, "sonar") == "1.0.0", timeout=60,
               what=f"the node to serve the model from the bundle\n{node.log_text()}")
    status = node.status()
    assert status["bundles"]["applied_sequence"] == 1 and status["last_sync_at"] is None  # never dialled

    # A policy change (the site's labels are in its signed policy) travels by the next bundle.
    services.site_update(actor=ACTOR, site=site_base7, labels={"zone": "north"})
    generation = node.status()["applied_generation"]
    second = export(site_base7, tmp_path, "in-2.ewb", part_size=1024 * 1024)
    assert read_metadata(second.with_name("in-2.ewb.001")).signed.sequence == 2
    # A technician only copies the parts into the drop folder.
    drop = tmp_path / "s-1-drop"
    drop.mkdir(exist_ok=True)
    for part in sorted(tmp_path.glob("in-2.ewb.*")):
        shutil.copy(part, drop / part.name)
    wait_until(lambda: node.status()["applied_generation"] > generation, timeout=30,
               what=f"the policy change to apply\n{node.log_text()}")
    assert json.loads(node.state_dir.joinpath("desired_state.json").read_text())["payload"].count('"zone":"north"')
    assert (drop / "imported" / "in-2.ewb.001").exists() and not list(drop.glob("in-2.ewb.*"))

    # Each bad bundle is refused with its reason; the model keeps serving throughout.
    assert "imported already" in refused(node, second.with_name("in-2.ewb.001"))
    assert "rollback" in refused(node, first)
    foreign_node = edge_node(site_berlin, "gw-berlin", start=False)
    assert foreign_node.state_dir.exists()
    assert "for site plant-berlin, not for this node's site base-7" in refused(
        node, export(site_berlin, tmp_path, "berlin.ewb"))

    third = export(site_base7, tmp_path, "in-3.ewb", full=True)
    flipped = tmp_path / "flipped.ewb"
    data = bytearray(third.read_bytes())
    data[data.index(onnx_factory.linear(seed=1)[64:128]) + 10] ^= 0x01  # a byte inside the model's artifact
    flipped.write_bytes(bytes(data))
    assert "was altered" in refused(node, flipped)
    truncated = tmp_path / "truncated.ewb"
    truncated.write_bytes(third.read_bytes()[: len(data) // 2])
    assert "truncated" in refused(node, truncated)
    forged = tmp_path / "forged.ewb"
    meta = read_metadata(third).signed
    write_bundle(forged, {**meta.model_dump(exclude={"members"}), "sequence": 99},
                 [Source.json(f"nodes/{node_id(node)}.json", {"node_id": node_id(node)})],
                 signing.generate_private_key())
    assert "not by this node's pinned control plane key" in refused(node, forged)
    # Expired: refused by the site's default policy (checked as of a day after it expired).
    state = StateDir(node.state_dir)
    assert meta.expires is not None
    late = meta.expires + dt.timedelta(days=1)
    with pytest.raises(BundleRefused, match="expired at .* this site's policy refuses expired bundles"):
        import_bundle(state, third, now=late)
    assert model_version(url, "sonar") == "1.0.0"
    assert "rollback" in refused(node, first) and node.status()["bundles"]["in_sequence"] == 2

    # The site's policy set to accept expired bundles travels in a (fresh) bundle; the policy in force at the node
    # decides, never the expired bundle itself. Then an expired one is taken, and the warning recorded.
    services.site_update(actor=ACTOR, site=site_base7, expired_bundles=ExpiredBundles.WARN)
    node.cli("import-bundle", str(export(site_base7, tmp_path, "in-4.ewb")), "--state-dir", str(node.state_dir))
    wait_until(lambda: node.status()["bundles"]["applied_sequence"] == 4, what=f"bundle 4 to apply\n{node.log_text()}")
    fifth = export(site_base7, tmp_path, "in-5.ewb")
    expires = read_metadata(fifth).signed.expires
    assert expires is not None
    late = expires + dt.timedelta(days=1)
    imported = import_bundle(state, fifth, now=late)
    assert "expired at" in imported.warning and "imported as the site's policy allows" in imported.warning
    wait_until(lambda: node.status()["bundles"]["applied_sequence"] == 5, what="bundle 5 to apply")
    assert node.status()["bundles"]["in_warning"] == imported.warning
    assert model_version(url, "sonar") == "1.0.0"

    # The node's audit log holds each import and each refusal, with its reason.
    events = [(e.action, e.detail) for e in NodeAudit.in_state_dir(node.state_dir).events_after(0, limit=10_000)]
    reasons = [d["reason"] for a, d in events if a == "bundle.refused"]
    assert len(reasons) == 8 and any("rollback" in r for r in reasons) and any("altered" in r for r in reasons)
    assert [d["sequence"] for a, d in events if a == "bundle.imported"] == [1, 2, 4, 5]
    assert any(a == "bundle.imported" and "warning" in d for a, d in events)
    assert [d["sequence"] for a, d in events if a == "bundle.applied"] == [1, 2, 4, 5]


def node_id(node: EdgeNode) -> str:
    return str(json.loads(node.state_dir.joinpath("identity.json").read_text())["node_id"])

"""The model registry in a real browser: from a new model to a node that serves it.

An admin creates a model, uploads an ONNX file through the form and watches
the upload's progress bar, then the version's validation in a real Celery
worker until it is valid, deploys it to a site (a one-wave rollout), and follows it to the node
page, where a real edge runtime reports it serving.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from audit.models import AuditEvent
from audit.services import Actor
from models_registry.models import Deployment, ModelVersion
from policies.services import policy_update
from rollouts.models import Rollout
from tests.browser.support import log_in, snap
from tests.fixtures.personas import make_region, make_site, make_user
from tests.fixtures.processes import ControlPlane
from tests.fixtures.workers import Worker
from tests.models_registry import onnx_factory

pytestmark = [pytest.mark.browser, pytest.mark.process]

# Records every value the upload form's <progress> shows while it is visible;
# exposed to the page as a binding, so it survives the redirect after the upload.
WATCH_PROGRESS = """
() => {
  const bar = document.querySelector("form[data-upload-progress] progress.upload-progress");
  new MutationObserver(() => {
    if (!bar.hidden) window.recordProgress(Number(bar.value), Number(bar.max));
  }).observe(bar, {attributes: true});
  return bar !== null;
}
"""


def test_it_takes_an_admin_from_a_new_model_to_a_node_that_serves_it(
    live_control_plane: ControlPlane, celery_worker_process: Worker, edge_node: Any, browser: Browser,
    tmp_path: Path,
) -> None:
    berlin = make_site(make_region("eu", "Europe"), "plant-berlin", name="Plant Berlin", jurisdiction="DE")
    make_user("ada", superuser=True)
    edge_node(berlin, "gw-1", role="gateway")
    policy_update(actor=Actor.system("test"), kind="rollout", document={"defaults": {"bake_s": 0, "gate": None}})
    # A file big enough that the upload is not a single instant.
    artifact = tmp_path / "defects.onnx"
    artifact.write_bytes(onnx_factory.linear(in_features=512, out_features=256, seed=11))

    page: Page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.set_default_timeout(20_000)
    base = live_control_plane.url
    log_in(page, live_control_plane, "ada", "/")
    expect(page).to_have_url(f"{base}/")

    # The registry from the main navigation; empty so far.
    page.locator("nav.mainnav").get_by_role("link", name="Models").click()
    expect(page).to_have_url(f"{base}/models/")
    expect(page.locator("nav.mainnav a[aria-current=page]")).to_have_text("Models")
    expect(page.locator("main")).to_contain_text("No models yet.")

    page.get_by_role("link", name="New model").click()
    page.get_by_label("Name on the wire").fill("defects")
    page.get_by_label("Name", exact=True).fill("Defect classifier")
    page.get_by_label("Description").fill("Flags defective parts from line sensor readings.")
    page.get_by_role("button", name="Create model").click()
    expect(page).to_have_url(f"{base}/models/defects/")
    expect(page.locator("h1")).to_contain_text("Defect classifier")

    # Upload through the form, watching the progress bar.
    progress: list[tuple[float, float]] = []
    page.expose_function("recordProgress", lambda value, top: progress.append((value, top)))
    assert page.evaluate(WATCH_PROGRESS)
    upload = page.locator("#upload-panel form")
    expect(upload.locator("progress.upload-progress")).to_be_hidden()
    upload.get_by_label("File").set_input_files(str(artifact))
    upload.get_by_label("Version").fill("1.0.0")
    upload.get_by_label("Make an int8 variant for small devices").check()
    upload.get_by_role("button", name="Upload and validate").click()

    # The page comes back with the version, and follows its validation by itself.
    badge = page.locator("#versions-panel article.version .badge[data-status]")
    expect(badge).to_have_count(1)
    expect(badge).to_have_attribute("data-status", "valid", timeout=60_000)
    expect(badge).to_have_text("Valid")
    size = artifact.stat().st_size
    assert progress, "the upload's progress bar never showed"
    assert max(top for _, top in progress) >= size and progress[-1][0] == progress[-1][1], progress
    version = ModelVersion.objects.get(model__slug="defects", version="1.0.0")
    assert version.status == "valid" and version.size == size
    assert version.created_by is not None and version.created_by.username == "ada"
    article = page.locator("#versions-panel article.version")
    article.get_by_text("Validation log and timeline").click()
    expect(article.locator(".validation-log li.ok")).to_contain_text(["parse", "smoke inference"])
    expect(article.locator(".timeline li")).to_have_count(3)  # uploaded, validating, valid
    expect(article).to_contain_text("int8")
    snap(page, "model-detail")

    # Deploy it to the site: a one-wave rollout under the rollout policy (here: no approval, no gate, no bake),
    # followed on its page until it succeeds; the site then keeps the version as a deployment.
    deploy = page.locator("#deploy-panel")
    deploy.get_by_label("Plant Berlin").check()
    deploy.get_by_role("button", name="Deploy").click()
    expect(page.locator("h1")).to_contain_text("Deploy of defects")
    expect(page.locator("#deploy-note")).to_contain_text("one wave under the rollout policy")
    expect(page.locator("#rollout-live .rollout-head .badge")).to_have_attribute("data-state", "succeeded",
                                                                                 timeout=60_000)
    rollout = Rollout.objects.get(version=version)
    assert rollout.kind == "deploy" and rollout.requested_by.username == "ada" and len(rollout.waves) == 1
    page.locator("h1").get_by_role("link", name="defects").click()
    article = page.locator("#versions-panel article.version")
    deployments = article.locator("table", has=page.get_by_role("columnheader", name="Since"))
    expect(deployments).to_contain_text("site Plant Berlin")
    deployment = Deployment.objects.get(version=version, removed_at__isnull=True)
    assert deployment.site_id == berlin.pk
    assert AuditEvent.objects.filter(action="rollout.create", actor="ada").count() == 1
    assert AuditEvent.objects.filter(action="deployment.create").count() == 1

    # Where it runs → the node page, whose Models panel refreshes until the node serves it.
    article.get_by_role("link", name="plant-berlin/gw-1").click()
    expect(page.locator("h1")).to_contain_text("gw-1")
    row = page.locator('#node-models tr[data-model="defects"]')
    expect(row).to_contain_text("1.0.0")
    expect(row.locator(".badge")).to_have_text(re.compile("serving", re.I), timeout=60_000)
    expect(row).to_contain_text("CPUExecutionProvider")
    # The rest of the page follows the panel: the node applied the new desired state.
    expect(page.locator("#node-generation")).to_contain_text("(in sync)")
    expect(page.locator("#node-actual")).to_contain_text('"state": "serving"')
    snap(page, "node-models")

    row.get_by_role("link", name="defects").click()
    expect(page).to_have_url(f"{base}/models/defects/")
    page.locator("nav.mainnav").get_by_role("link", name="Models").click()
    listing = page.locator("main table tbody tr", has=page.get_by_role("link", name="Defect classifier"))
    expect(listing).to_contain_text("1.0.0")
    expect(listing.locator(".badge")).to_have_text("Valid")
    snap(page, "model-list")

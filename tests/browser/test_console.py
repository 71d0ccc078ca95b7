"""The console in a real browser: headless Chromium against the real control plane.

One operator's main path: log in, see the fleet with a live node, filter by
region, open a site, create an enrollment token, see it once and download the
installer that carries it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from audit.services import Actor
from policies.permissions import role_grant
from sites import services
from sites.models import EnrollmentToken
from tests.browser.support import snap
from tests.fixtures.personas import PASSWORD, make_region, make_site, make_user
from tests.fixtures.processes import ControlPlane

pytestmark = [pytest.mark.browser, pytest.mark.process]


def test_it_takes_an_operator_from_login_to_a_downloaded_installer(
    live_control_plane: ControlPlane, edge_node: Any, browser: Browser, tmp_path: Path
) -> None:
    eu, us = make_region("eu", "Europe"), make_region("us", "Americas")
    berlin = make_site(eu, "plant-berlin", name="Plant Berlin", jurisdiction="DE")
    make_site(eu, "store-hamburg", name="Store Hamburg", jurisdiction="DE")
    make_site(us, "plant-ohio", name="Plant Ohio", jurisdiction="US")
    user = make_user("olivia")
    role_grant(actor=Actor.system("test"), principal=user, role="Operator", obj=eu)
    role_grant(actor=Actor.system("test"), principal=user, role="Viewer", obj=us)
    edge_node(berlin, "gw-1", role="gateway")

    page: Page = browser.new_page(viewport={"width": 1360, "height": 820}, accept_downloads=True)
    page.set_default_timeout(20_000)

    # Anonymous: sent to the login form, then back to the fleet.
    page.goto(f"{live_control_plane.url}/")
    expect(page).to_have_url(re.compile(r"/login/\?next=/$"))
    page.get_by_label("Username").fill("olivia")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{live_control_plane.url}/")
    expect(page.locator("header .username")).to_have_text("olivia")

    table = page.locator("#fleet-table")
    for name in ["Plant Berlin", "Store Hamburg", "Plant Ohio"]:
        expect(table.get_by_role("link", name=name)).to_be_visible()
    # The real node's syncs reach the table through its own refresh.
    berlin_row = table.locator("tr", has=page.get_by_role("link", name="Plant Berlin"))
    expect(berlin_row).to_contain_text("1 / 1", timeout=30_000)
    expect(berlin_row.locator(".badge")).to_have_text("online")

    # Filter by region: the table is swapped and the URL pushed.
    page.get_by_label("Region").select_option("eu")
    expect(page).to_have_url(re.compile(r"\?region=eu"))
    expect(table.get_by_role("link", name="Plant Ohio")).to_have_count(0)
    expect(table.get_by_role("link", name="Store Hamburg")).to_be_visible()
    snap(page, "fleet")

    # The site page: its node and the token form.
    table.get_by_role("link", name="Plant Berlin").click()
    expect(page).to_have_url(f"{live_control_plane.url}/sites/plant-berlin/")
    nodes = page.locator("#nodes-table")
    expect(nodes.get_by_role("link", name="gw-1")).to_be_visible()
    expect(nodes.locator(".badge").first).to_have_text("online")

    form = page.locator("form.token-form")
    form.get_by_label("Max uses").fill("0")
    form.get_by_role("button", name="Create token").click()
    expect(page.locator(".field-error")).to_contain_text("Max uses: Ensure this value is greater than or equal to 1")

    form = page.locator("form.token-form")
    form.get_by_label("Max uses").fill("3")
    form.get_by_label("Lifetime (hours)").fill("12")
    form.get_by_label("Note").fill("line 3 boxes")
    form.get_by_role("button", name="Create token").click()
    value_el = page.locator("#token-value")
    expect(value_el).to_have_text(re.compile(r"^ewt_[\w-]+$"))
    value = value_el.inner_text()
    expect(page.locator("#enroll-command")).to_have_text(
        f"printf '%s\\n' '{value}' | edge-runtime enroll --url {live_control_plane.url} --token-stdin")
    expect(page.locator("#tokens-table")).to_contain_text("line 3 boxes")
    snap(page, "site")
    token = EnrollmentToken.objects.get(note="line 3 boxes")
    assert token.token_hash == services.secret_hash(value) and token.max_uses == 3

    with page.expect_download() as info:
        page.get_by_role("button", name="Download installer").click()
    download = info.value
    assert download.suggested_filename == "edgewise-install-plant-berlin.sh"
    script = Path(download.path()).read_text()
    assert value in script and live_control_plane.url in script

    # Shown once: a reload no longer has it.
    page.reload()
    expect(page.locator("#tokens-table")).to_contain_text("line 3 boxes")
    expect(page.locator("#token-value")).to_have_count(0)
    assert value not in page.content()

    nodes.get_by_role("link", name="gw-1").click()
    # The node page reads its audit log panel too: on a loaded CI machine it may take longer than the default 5 s.
    expect(page.locator("h1")).to_contain_text("gw-1", timeout=20_000)
    expect(page.locator("main")).to_contain_text("node.enroll")
    snap(page, "node")

    # The audit trail: filter, then expand a row in place to its before/after.
    page.get_by_role("link", name="Audit").click()
    page.get_by_label("Action").fill("token.create")
    expect(page).to_have_url(re.compile(r"action=token\.create"))
    rows = page.locator("#audit-table tbody tr:not(.detail-row)")
    expect(rows).to_have_count(2)  # the edge node's token and the one created above
    rows.first.get_by_role("link").click()
    expect(page.locator("#audit-table .event-body").first).to_contain_text('"max_uses": 3')
    snap(page, "audit")

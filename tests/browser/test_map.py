"""The fleet map and the live site page in a real browser (headless Chromium) against the real control plane
and a real edge runtime: live charts fill from the node's telemetry; the site's marker changes colour when
the node stops; nothing is fetched from outside the control plane."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.fixtures.personas import PASSWORD, make_region, make_site, make_user
from tests.fixtures.processes import ControlPlane

pytestmark = [pytest.mark.browser, pytest.mark.process]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_it_shows_a_sites_marker_change_colour_when_its_node_stops(
    live_control_plane: ControlPlane, edge_node: Any, browser: Browser
) -> None:
    eu, us = make_region("eu", "Europe"), make_region("us", "Americas")
    berlin = make_site(eu, "plant-berlin", name="Plant Berlin", latitude=52.52, longitude=13.40)
    make_site(us, "plant-ohio", name="Plant Ohio", latitude=40.0, longitude=-83.0)
    make_user("ada", superuser=True)
    node = edge_node(berlin, "gw-1", start=False)
    node.args = ["--telemetry-interval", "0.5"]
    node.start()

    page: Page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(20_000)
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url)
            if not r.url.startswith((live_control_plane.url, f"ws://127.0.0.1:{live_control_plane.port}", "data:"))
            else None)
    page.goto(f"{live_control_plane.url}/login/?next=/sites/plant-berlin/")
    page.get_by_label("Username").fill("ada")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()

    # The site page: live, its node's resources charted as telemetry arrives, the link's last confirmation shown.
    expect(page).to_have_url(f"{live_control_plane.url}/sites/plant-berlin/")
    expect(page.locator(".live-indicator")).to_have_text("live")
    cpu = page.locator('#resource-charts .chart-group[data-node="gw-1"] figure[data-chart="CPU"] figcaption strong')
    expect(cpu).to_have_text(re.compile(r"^\d+(\.\d+)? %$"), timeout=30_000)
    expect(page.locator("#site-status")).to_contain_text(re.compile(r"last confirmed \d+ s ago"))

    # The map: the site's marker in the status colour, changing when its node stops.
    page.get_by_role("link", name="Map", exact=True).click()
    expect(page).to_have_url(f"{live_control_plane.url}/map/")
    expect(page.locator(".live-indicator")).to_have_text("live")
    marker = page.locator('.site-marker[data-site="plant-berlin"]')
    expect(marker).to_have_attribute("data-status", "online", timeout=30_000)
    expect(page.locator('.site-marker[data-site="plant-ohio"]')).to_have_attribute("data-status", "empty")
    online_colour = marker.evaluate("e => getComputedStyle(e).backgroundColor")
    expect(page.locator(".leaflet-overlay-pane path").first).to_be_attached()  # the bundled basemap drew

    node.stop()
    expect(marker).to_have_attribute("data-status", "offline", timeout=30_000)
    offline_colour = marker.evaluate("e => getComputedStyle(e).backgroundColor")
    assert offline_colour != online_colour

    # Click for the site: its popup says when the link was last confirmed and leads to the site page.
    marker.click()
    popup = page.locator(".leaflet-popup-content")
    expect(popup).to_contain_text("last confirmed")
    expect(popup).to_contain_text("0 / 1 nodes online")
    popup.get_by_role("link", name="Plant Berlin").click()
    expect(page).to_have_url(f"{live_control_plane.url}/sites/plant-berlin/")
    expect(page.locator("#site-status .badge")).to_have_text("offline")
    assert outside == [], f"the console fetched from outside the control plane: {outside}"

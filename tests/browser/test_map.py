"""The fleet map and the live site page in a real browser (headless Chromium) against the real control plane
and a real edge runtime: live charts fill from the node's telemetry; the site's marker changes colour when
the node stops; nothing is fetched from outside the control plane."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.support import log_in, watch_outside
from tests.fixtures.personas import make_region, make_site, make_user
from tests.fixtures.processes import ControlPlane

pytestmark = [pytest.mark.browser, pytest.mark.process]


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
    outside = watch_outside(page, live_control_plane)
    log_in(page, live_control_plane, "ada", "/sites/plant-berlin/")

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

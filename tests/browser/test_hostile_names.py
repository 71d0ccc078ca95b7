"""Hostile names in a real browser: no value an operator or a node chooses runs as script anywhere in the console.

The estate of ``tests.browser.hostile`` carries a payload in every free-text
value, from the console's services and from a node's enroll and sync. Each
payload calls ``xss()``, a function of the test; the test visits every
console page and the map's markers and popups and asserts that it was never
called, that no element carries an injected handler, ``javascript:`` URL or
script, and that every value is on the page as text (a page that dropped it
would pass the first two checks).

The pages are loaded with the browser's Content-Security-Policy switched off:
the console's escaping must hold on its own (the policy, tested in
``test_csp.py``, is the second wall, not the first).
"""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect

from tests.browser.hostile import Estate, console_pages
from tests.browser.support import log_in
from tests.fixtures.processes import ControlPlane

pytestmark = [pytest.mark.browser, pytest.mark.process]

# Elements with an on* attribute, javascript: URLs and inline scripts (json_script's data blocks aside):
# none of them is in any console page, so any one found was injected.
INJECTED = """
() => {
  const found = [];
  for (const el of document.querySelectorAll("*")) {
    for (const attr of el.attributes) {
      if (attr.name.startsWith("on")) found.push(`${el.tagName} ${attr.name}=${attr.value}`);
      const url = ["href", "src", "action", "formaction", "xlink:href"].includes(attr.name);
      if (url && /^\\s*javascript:/i.test(attr.value)) found.push(`${el.tagName} ${attr.name}=${attr.value}`);
    }
  }
  for (const script of document.scripts) {
    if (!script.src && script.type !== "application/json") found.push(`inline: ${script.textContent.slice(0, 80)}`);
  }
  return found;
}
"""


def _settle(page: Page) -> None:
    """Long enough for an injected animation to start and its handler's call to reach the test."""
    page.wait_for_timeout(300)


def test_it_runs_no_script_from_any_name_on_any_page(
    live_control_plane: ControlPlane, hostile: Estate, browser: Browser
) -> None:
    cp, estate = live_control_plane, hostile
    context: BrowserContext = browser.new_context(bypass_csp=True, viewport={"width": 1360, "height": 900})
    calls: list[str] = []
    errors: list[str] = []
    context.expose_function("xss", lambda tag="": calls.append(str(tag)))
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    log_in(page, cp, "ada", "/")
    expect(page).to_have_url(f"{cp.url}/")

    for path, shown in console_pages(estate):
        page.goto(f"{cp.url}{path}")
        main = page.locator("main")
        for value in shown:
            expect(main, f"{path} shows {value!r} as text").to_contain_text(value)
        _settle(page)
        assert calls == [], f"{path} ran injected script: {calls}"
        assert page.evaluate(INJECTED) == [], path

    # The map: markers titled with the names, popups with the names as text and the server's link.
    page.goto(f"{cp.url}/map/")
    expect(page.locator("#unplaced-sites")).to_contain_text(estate["unplaced"])
    placed = ((estate.site, estate["region"]), (estate.second, estate["other_region"]))
    for site, _ in placed:
        expect(page.locator(f'.site-marker[data-site="{site.slug}"]')).to_be_attached()
    _settle(page)
    assert calls == [], f"the map ran injected script: {calls}"
    assert page.evaluate(INJECTED) == [], "map"
    for site, region in placed:
        marker = page.locator(f'.site-marker[data-site="{site.slug}"]')
        title = re.compile(f"^{re.escape(site.name)}: (online|degraded|offline|no nodes)$")
        expect(marker).to_have_attribute("title", title)
        marker.click()
        popup = page.locator(".leaflet-popup-content")
        expect(popup).to_contain_text(site.name)
        expect(popup).to_contain_text(region)
        expect(popup.locator("a")).to_have_attribute("href", f"/sites/{site.slug}/")
        _settle(page)
        assert calls == [], f"the map's popup ran injected script: {calls}"
        assert page.evaluate(INJECTED) == [], "map popup"
        page.locator(".leaflet-popup-close-button").click()
        expect(popup).to_have_count(0)
    assert errors == [], errors
    context.close()


def test_it_links_a_map_popup_only_to_a_page_of_the_console(
    live_control_plane: ControlPlane, hostile: Estate, browser: Browser
) -> None:
    """Should the map's data ever carry a site URL that is not a path of this console (a javascript: URL,
    another origin), the popup shows the site's name unlinked."""
    cp, estate = live_control_plane, hostile
    context = browser.new_context(bypass_csp=True, viewport={"width": 1360, "height": 900})
    calls: list[str] = []
    context.expose_function("xss", lambda tag="": calls.append(str(tag)))
    forged = ["javascript:xss(`url`)", "https://elsewhere.example/sites/plant-berlin/", "//elsewhere.example/"]

    def forge(route: Route) -> None:
        response = route.fetch()
        data = response.json()
        for i, site in enumerate(data["sites"]):
            site["url"] = forged[i % len(forged)]
        route.fulfill(response=response, body=json.dumps(data), content_type="application/json")

    context.route("**/map/sites.json", forge)
    page = context.new_page()
    page.set_default_timeout(20_000)
    log_in(page, cp, "ada", "/map/")
    expect(page).to_have_url(f"{cp.url}/map/")
    # The map's reload (every 5 s) brings the forged URLs.
    with page.expect_response(re.compile(r"/map/sites\.json$"), timeout=15_000):
        pass
    page.wait_for_timeout(300)
    for site in (estate.site, estate.second):
        page.locator(f'.site-marker[data-site="{site.slug}"]').click()
        popup = page.locator(".leaflet-popup-content")
        expect(popup.locator("strong")).to_have_text(site.name)
        expect(popup.locator("a")).to_have_count(0)
        page.locator(".leaflet-popup-close-button").click()
        expect(popup).to_have_count(0)
    assert calls == []
    context.close()

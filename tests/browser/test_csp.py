"""The Content-Security-Policy, on the wire and in a real browser.

Every HTML response carries the strict policy of ``orchestrator.csp``; every
console page and the Django admin work under it without one violation: no
inline script, handler or style, no eval, websockets and htmx swaps included.
Violations are collected two ways: a ``securitypolicyviolation`` listener
installed before any page script runs, and Chromium's console messages.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from playwright.sync_api import Browser, Page, Response, expect

from orchestrator import csp
from sites.models import Node
from tests.browser.hostile import Estate, console_pages
from tests.fixtures.personas import PASSWORD
from tests.fixtures.processes import ControlPlane

EXPECTED: dict[str, list[str]] = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "connect-src": ["'self'"],
    "font-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'self'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}

# Installed in every document before its own scripts: each violation is reported to the test as it happens.
WATCH = """
document.addEventListener("securitypolicyviolation", (e) => {
  window.cspViolation(`${location.pathname}: ${e.violatedDirective} refused ${e.blockedURI || "inline"} ` +
                      `(${e.sourceFile}:${e.lineNumber}) ${e.sample}`);
});
"""


def directives(header: str) -> dict[str, list[str]]:
    parsed: dict[str, list[str]] = {}
    for part in header.split(";"):
        name, *values = part.split()
        assert name not in parsed, f"{name} given twice in {header!r}"
        parsed[name] = values
    return parsed


def test_it_sets_the_policy_on_html_responses(client: Client, admin_user: Any) -> None:
    login = client.get("/login/")
    assert login["Content-Type"].startswith("text/html")
    assert directives(login[csp.HEADER]) == EXPECTED
    client.force_login(admin_user)
    for path in ("/", "/map/", "/models/", "/audit/", "/admin/", "/no-such-page/"):
        response = client.get(path)
        assert response["Content-Type"].startswith("text/html"), path
        assert directives(response[csp.HEADER]) == EXPECTED, path


def test_it_leaves_other_responses_alone(client: Client, admin_user: Any) -> None:
    client.force_login(admin_user)
    for path in ("/agent/v1/health", "/map/sites.json"):
        response = client.get(path)
        assert response["Content-Type"] == "application/json", path
        assert csp.HEADER not in response, path


def test_it_lets_the_map_load_tiles_from_a_configured_tile_server() -> None:
    value = directives(csp.policy(tile_url="https://{s}.tiles.example.org:8443/{z}/{x}/{y}.png"))
    assert value["img-src"] == ["'self'", "data:", "https://*.tiles.example.org:8443"]
    assert {k: v for k, v in value.items() if k != "img-src"} == {k: v for k, v in EXPECTED.items() if k != "img-src"}
    assert directives(csp.policy(tile_url="/tiles/{z}/{x}/{y}.png")) == EXPECTED


def test_it_refuses_a_tile_url_it_cannot_allow() -> None:
    for bad in ("https://tiles.example.org; script-src *", "ftp://tiles.example.org/{z}", "https://{a}.tiles.org/"):
        with pytest.raises(ImproperlyConfigured, match="EDGEWISE_MAP_TILE_URL must be an http"):
            csp.policy(tile_url=bad)


def _checked(page: Page, response: Response | None, violations: list[str], path: str) -> None:
    assert response is not None and response.ok, f"{path}: {response and response.status}"
    assert directives(response.headers["content-security-policy"]) == EXPECTED, path
    # Deferred scripts, htmx's processing and the first polls have run by then.
    page.wait_for_timeout(500)
    assert violations == [], violations


@pytest.mark.browser
@pytest.mark.process
def test_it_runs_every_console_page_and_the_admin_under_the_policy(
    live_control_plane: ControlPlane, hostile: Estate, browser: Browser
) -> None:
    cp, estate = live_control_plane, hostile
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    violations: list[str] = []
    context.expose_function("cspViolation", lambda text: violations.append(text))
    context.add_init_script(WATCH)
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)

    response = page.goto(f"{cp.url}/login/?next=/")
    _checked(page, response, violations, "/login/")
    page.get_by_label("Username").fill("ada")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{cp.url}/")

    for path, _ in console_pages(estate):
        _checked(page, page.goto(f"{cp.url}{path}"), violations, path)

    # htmx under the policy: no eval, no scripts from swaps, no injected <style>; its swaps still work.
    page.goto(f"{cp.url}/")
    assert page.evaluate("[htmx.config.allowEval, htmx.config.allowScriptTags, htmx.config.includeIndicatorStyles,"
                         " document.querySelectorAll('style').length]") == [False, False, False, 0]
    # The live socket: 'self' in connect-src covers ws:// of the page's own host and port.
    expect(page.locator(".live-indicator")).to_have_text("live")
    page.get_by_label("Region").select_option("us")
    expect(page).to_have_url(re.compile(r"\?region=us"))
    expect(page.locator("#fleet-table").get_by_role("link", name=estate["site"])).to_have_count(0)
    expect(page.locator("#fleet-table").get_by_role("link", name=estate["second"])).to_be_visible()
    page.goto(f"{cp.url}/audit/")
    page.locator("#audit-table tbody tr:not(.detail-row)").first.get_by_role("link").click()
    expect(page.locator("#audit-table .event-body").first).to_be_visible()
    page.goto(f"{cp.url}/sites/{estate.site.slug}/")
    expect(page.locator(".live-indicator")).to_have_text("live")
    page.goto(f"{cp.url}/rollouts/")
    bars = page.locator(".rollout-progress-bar")
    expect(bars.first).to_have_attribute("width", re.compile(r"^\d+%$"))
    assert violations == [], violations

    # Leaflet positions everything through the CSSOM, which the policy allows: the map draws and opens popups.
    _checked(page, page.goto(f"{cp.url}/map/"), violations, "/map/")
    expect(page.locator(".live-indicator")).to_have_text("live")
    expect(page.locator(".leaflet-overlay-pane path").first).to_be_attached()
    page.locator(f'.site-marker[data-site="{estate.second.slug}"]').click()
    expect(page.locator(".leaflet-popup-content")).to_contain_text(estate["second"])
    # Zooming animates markers and clusters through the CSSOM too.
    box = page.locator("#fleet-map").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -300)
    page.wait_for_timeout(800)
    assert violations == [], violations

    # The Django admin, under the same policy: its pages and their scripts.
    for path in ("/admin/", "/admin/sites/site/", f"/admin/sites/site/{estate.site.pk}/change/",
                 "/admin/sites/site/add/", f"/admin/sites/site/{estate.site.pk}/permissions/",
                 "/admin/auth/user/add/"):
        _checked(page, page.goto(f"{cp.url}{path}"), violations, path)
    # Sites are changed one by one through their service (no bulk action); nodes have one: revoke.
    nodes = Node.objects.count()
    assert nodes >= 1
    page.goto(f"{cp.url}/admin/sites/node/")
    page.locator("#action-toggle").check()
    expect(page.locator("input.action-select:checked")).to_have_count(nodes)
    expect(page.locator(".action-counter")).to_contain_text(f"{nodes} of {nodes} selected")
    assert violations == [], violations
    context.close()


@pytest.mark.browser
@pytest.mark.process
def test_it_reports_every_violation_to_the_test(live_control_plane: ControlPlane, browser: Browser) -> None:
    """The watch itself: an inline style and an inline script put into a console page are reported."""
    cp = live_control_plane
    context = browser.new_context()
    violations: list[str] = []
    context.expose_function("cspViolation", lambda text: violations.append(text))
    context.add_init_script(WATCH)
    page = context.new_page()
    page.goto(f"{cp.url}/login/")
    page.evaluate("""() => {
      const div = document.createElement("div");
      div.innerHTML = '<span style="color: red">x</span><img src="data:," onerror="window.ran = true">';
      document.body.appendChild(div);
    }""")
    page.wait_for_timeout(300)
    assert page.evaluate("window.ran === undefined")
    assert any("style-src" in v for v in violations) and any("script-src" in v for v in violations), violations
    context.close()

"""What every browser test needs: Chromium, a screenshot switch, a log-in, and a watch on outside requests."""

from __future__ import annotations

import os
from pathlib import Path

from playwright.sync_api import Page

from tests.fixtures.personas import PASSWORD
from tests.fixtures.processes import ControlPlane

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# A folder to save screenshots of each page into, when looking at the console's looks.
SCREENSHOTS = os.environ.get("EDGEWISE_SCREENSHOTS", "")


def snap(page: Page, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


def watch_outside(page: Page, cp: ControlPlane) -> list[str]:
    """The URLs the page requests from anywhere but the control plane (it must work air-gapped), as they come."""
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url)
            if not r.url.startswith((cp.url, f"ws://127.0.0.1:{cp.port}", "data:"))
            else None)
    return outside


def log_in(page: Page, cp: ControlPlane, username: str, next_path: str) -> None:
    """Through the login form, on to ``next_path``."""
    page.goto(f"{cp.url}/login/?next={next_path}")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()

"""The browser every test in this folder drives (headless Chromium, through Playwright), and the hostile estate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.browser.hostile import Estate, hostile_estate
from tests.browser.support import CHROMIUM, CHROMIUM_ARGS
from tests.fixtures.processes import ControlPlane


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    # Playwright's sync API keeps an event loop in this thread; the test's own
    # ORM calls between browser steps are still plain synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def hostile(live_control_plane: ControlPlane) -> Estate:
    """The estate of tests.browser.hostile, committed for the control plane. Ask for it before ``browser``:
    written before Playwright's event loop runs in this thread, its services' broadcasts go out."""
    return hostile_estate(live_control_plane)

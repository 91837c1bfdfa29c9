"""The web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Shared by ``test_web.py`` and ``scripts/screenshots.py``. Playwright's sync API runs in a worker
thread; the server and the fake provider run in the caller's trio loop, and the browser thread
reaches back into it with ``trio.from_thread``. Importing this module needs Playwright
(``scripts/install-test-deps.sh`` installs it and Chromium).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import trio
from playwright.sync_api import sync_playwright
from servers import WAIT

CHROMIUM = os.environ.get("ATLAS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
MS = int(WAIT * 1000)
ONLINE = '#status[data-state="online"]'


def with_page(url: str, steps: Callable[[Any], Any], **context: Any) -> Any:
    """Open ``url`` in a fresh headless Chromium and run ``steps(page)`` (in a worker thread)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_context(**context).new_page()
            page.set_default_timeout(MS)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            result = steps(page)
            assert not errors, errors
            return result
        finally:
            browser.close()


async def in_browser(url: str, steps: Callable[[Any], Any], **context: Any) -> Any:
    with trio.fail_after(WAIT * 3):
        return await trio.to_thread.run_sync(lambda: with_page(url, steps, **context))


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def sign_in_url(base: str, user: str, token: str) -> str:
    return f"{base}/#token={token}&user={user}"

"""Debian's headless Chromium, driven by Playwright without a browser download. CI installs it
(.ci/run); on a machine without it the browser checks are skipped with a printed reason."""

from __future__ import annotations

import contextlib
import os
import shutil

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MISSING = "no chromium on this machine: `apt-get install chromium` runs the browser checks"
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI needs Debian's chromium for the browser tests (.ci/run installs it)")


@contextlib.contextmanager
def signed_in_page(url: str, token: str):
    """A page signed in to the dashboard at `url`, and the list of every URL it requested."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            # The development CA is not in Chromium's store; TLS is checked with urllib elsewhere.
            context = browser.new_context(
                ignore_https_errors=True, viewport={"width": 1200, "height": 900}
            )
            page = context.new_page()
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(url + "/signin")
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")
            page.wait_for_url(url + "/runs")
            yield page, requests
        finally:
            browser.close()

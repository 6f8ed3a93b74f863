"""Screenshot a run's dashboard page (the README's picture): serve a run database's dashboard on
loopback and photograph /runs/RUN in Debian's headless chromium.

    .venv/bin/python scripts/dashboard_screenshot.py --database sqlite:///runs/fedmoe.db \
        --run 1 --out docs/dashboard-run.png
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import shutil
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from fedmoe.coordinator.service.certs import make_dev_certificates
from fedmoe.coordinator.service.service_config import AdminSection, AdminToken
from fedmoe.coordinator.store.db import RunStore
from fedmoe.coordinator.web.server import Dashboard, DashboardServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", required=True)
    parser.add_argument("--run", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    token = secrets.token_urlsafe(16)
    admin = AdminSection(
        tokens=(AdminToken(name="ops", sha256=hashlib.sha256(token.encode()).hexdigest()),)
    )
    certs = Path(tempfile.mkdtemp()) / "certs"
    make_dev_certificates(certs, ["127.0.0.1"])
    store = RunStore(args.database, migrate=False)
    server = DashboardServer(
        Dashboard(store, list, admin.caller, 1.0),
        "127.0.0.1:0",
        str(certs / "server.pem"),
        str(certs / "server.key"),
    ).start()
    url = f"https://127.0.0.1:{server.port}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"), args=["--no-sandbox"]
            )
            page = browser.new_context(
                ignore_https_errors=True, viewport={"width": 1000, "height": 800}
            ).new_page()
            page.goto(url + "/signin")
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")
            page.goto(f"{url}/runs/{args.run}")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.stop()
        store.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright without a
browser download): sign-in, a runs page that follows a live run, a run page whose charts carry
the database's numbers, and no request anywhere but the coordinator. Screenshots of each page
are left in the test's temp folder."""

from __future__ import annotations

import datetime as dt

import pytest
from browser import CHROMIUM, MISSING
from test_cli_operator import finished_run
from test_dashboard import TOKEN, Site

from fedmoe.coordinator.store.db import ParticipationRecord, RoundRecord, RunStore

if CHROMIUM is None:
    pytest.skip(MISSING, allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")


def _round(number: int, loss: float) -> RoundRecord:
    start = dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.UTC) + dt.timedelta(minutes=number)
    return RoundRecord(
        number=number,
        started_at=start,
        ended_at=start + dt.timedelta(seconds=7),
        status="completed",
        bytes_up=1000,
        bytes_down=2000,
        server_eval_loss=loss,
        participations=[
            ParticipationRecord(node_id="7", status="ok", enterprise="acme", epsilon_record=number)
        ],
    )


@pytest.fixture
def site(tmp_path):
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    finished_run(store, tmp_path, beat_base=True)
    live = store.create_run(
        {"federation": {"rounds": 3}},
        planned_rounds=3,
        engine="deployment",
        enterprises=["acme"],
        started_by="ops",
        privacy_plan={"record": {"epsilon": 4.0, "delta": 1e-5, "clip": 1.0, "accountant": "rdp"}},
    )
    store.mark_running(live)
    store.set_base_eval(live, 2.0)
    store.record_round(live, _round(1, 1.9))
    s = Site(tmp_path, store)
    s.live_run = live
    yield s
    s.server.stop()
    store.close()


@pytest.fixture
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def test_the_dashboard_in_chromium(site, browser, tmp_path):
    # The development CA is not in Chromium's store; TLS itself is checked in test_dashboard.py.
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    # Sign-in: nothing without a token, nothing with a wrong one.
    page.goto(site.url + "/runs")
    assert page.url == site.url + "/signin"
    page.click("button[type=submit]")  # empty: the form itself refuses
    assert page.url == site.url + "/signin" and not context.cookies()
    page.fill("input[name=token]", "not-the-token")
    page.click("button[type=submit]")
    assert "unknown token" in page.inner_text("#signin-error") and not context.cookies()
    page.screenshot(path=tmp_path / "signin.png")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(site.url + "/runs")
    errors.clear()  # the wrong token's 401 is the page's to show; nothing after it may fail

    # Runs: every run of the database, and the live one follows its rounds as they commit.
    rows = page.locator("#runs tbody tr")
    assert sorted(int(r.get_attribute("data-run")) for r in rows.all()) == [
        r.id for r in site.store.runs()
    ]
    live_rounds = page.locator(f'tr[data-run="{site.live_run}"] td.rounds')
    assert live_rounds.inner_text() == "1 / 3"
    site.store.record_round(site.live_run, _round(2, 1.7))
    playwright.expect(live_rounds).to_have_text("2 / 3", timeout=15_000)
    page.screenshot(path=tmp_path / "runs.png", full_page=True)

    # A run: the curves and the epsilon chart hold the database's numbers.
    page.goto(f"{site.url}/runs/{site.live_run}")
    marks = page.locator('#chart-loss circle[data-series="server eval"]')
    drawn = [
        (float(m.get_attribute("data-x")), float(m.get_attribute("data-y"))) for m in marks.all()
    ]
    rounds = site.store.rounds(site.live_run)
    assert drawn == [(r.number, r.server_eval_loss) for r in rounds]
    base = page.locator('#chart-loss line[data-series="base model (server eval)"]')
    assert float(base.get_attribute("data-y")) == site.store.run(site.live_run).base_eval_loss
    spent = page.locator('#chart-epsilon circle[data-series="acme (record)"]')
    assert [float(m.get_attribute("data-y")) for m in spent.all()] == [
        p.epsilon_record for r in rounds for p in r.participations
    ]
    target = page.locator('#chart-epsilon line[data-series="record-level target"]')
    assert float(target.get_attribute("data-y")) == 4.0
    page.click("#figure-loss summary")  # the numbers, a click away
    assert page.locator("#table-loss tbody tr").count() == len(rounds)
    page.screenshot(path=tmp_path / "run.png", full_page=True)
    site.store.record_round(site.live_run, _round(3, 1.6))
    site.store.finish_run(site.live_run, "completed")
    playwright.expect(page.locator("#run-status")).to_have_text("completed", timeout=15_000)
    assert page.locator("#chart-loss circle").count() >= 3

    page.goto(site.url + "/nodes")
    assert page.locator('#nodes tr[data-enterprise="clinical"]').inner_text().count("online") == 1
    page.screenshot(path=tmp_path / "nodes.png", full_page=True)

    # Nothing but the coordinator: no CDN, no fonts, no analytics.
    assert requests and all(url.startswith(site.url + "/") for url in requests), requests
    assert errors == []
    for name in ("signin", "runs", "run", "nodes"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000

"""The dashboard over real HTTPS: sign-in, read-only routes, the JSON API as the admin API's
messages, and every chart's numbers as the database holds them."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict
from test_cli_operator import finished_run

from fedmoe.coordinator.service.certs import make_dev_certificates
from fedmoe.coordinator.service.service_config import AdminSection, AdminToken
from fedmoe.coordinator.store.db import RunStore
from fedmoe.coordinator.store.views import privacy_ledger_message, rounds_response, runs_response
from fedmoe.coordinator.web.server import Dashboard, DashboardServer
from fedmoe.proto import admin_pb2 as pb

TOKEN = "a-test-admin-token"
NODES = [
    pb.Node(
        enterprise="clinical",
        fingerprint="SHA256:abc",
        status="active",
        online=True,
        flower_node_id="123",
        registered_at="2026-12-03T09:00:00.000+00:00",
        registered_by="ops",
    ),
    pb.Node(enterprise="finance", fingerprint="SHA256:def", status="revoked", online=False),
]


class Site:
    def __init__(self, root: Path, store: RunStore):
        make_dev_certificates(root / "certs", ["127.0.0.1", "localhost"])
        admin = AdminSection(
            tokens=(AdminToken(name="ops", sha256=hashlib.sha256(TOKEN.encode()).hexdigest()),)
        )
        self.store = store
        self.server = DashboardServer(
            Dashboard(store, lambda: NODES, admin.caller, session_hours=1.0),
            "127.0.0.1:0",
            str(root / "certs" / "server.pem"),
            str(root / "certs" / "server.key"),
        ).start()
        self.url = f"https://127.0.0.1:{self.server.port}"
        self.ca = str(root / "certs" / "ca.pem")
        self.tls = ssl.create_default_context(cafile=self.ca)

    def get(self, path: str, token: str | None = None, cookie: str | None = None):
        request = urllib.request.Request(self.url + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        if cookie:
            request.add_header("Cookie", cookie)
        return self._open(request)

    def post(self, path: str, body: bytes):
        return self._open(urllib.request.Request(self.url + path, data=body, method="POST"))

    def _open(self, request):
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self.tls), _NoRedirect()
        )
        try:
            with opener.open(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read().decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    store = RunStore(f"sqlite:///{root / 'runs.db'}")
    finished_run(store, root, beat_base=True)
    finished_run(store, root, beat_base=False, server_eval=False)
    s = Site(root, store)
    yield s
    s.server.stop()
    store.close()


def test_without_a_token_nothing_but_the_sign_in_page_is_served(site):
    status, headers, _ = site.get("/runs")
    assert status == 303 and headers["Location"] == "/signin"
    status, _, body = site.get("/api/runs")
    assert status == 401 and "admin token" in body
    status, _, body = site.get("/api/runs", token="wrong")
    assert status == 401
    status, _, body = site.get("/signin")
    assert status == 200 and 'name="token"' in body


def test_sign_in_refuses_a_wrong_token_and_sets_a_strict_cookie_for_a_right_one(site):
    status, headers, body = site.post("/signin", b"token=nope")
    assert status == 401 and "unknown token" in body and "Set-Cookie" not in headers
    status, headers, _ = site.post("/signin", f"token={TOKEN}".encode())
    assert status == 303 and headers["Location"] == "/runs"
    cookie = headers["Set-Cookie"]
    assert all(flag in cookie for flag in ("Secure", "HttpOnly", "SameSite=Strict"))
    session = cookie.split(";")[0]
    status, headers, body = site.get("/runs", cookie=session)
    assert status == 200 and "ops" in body and 'id="runs"' in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    site.get("/signout", cookie=session)
    assert site.get("/runs", cookie=session)[0] == 303  # signed out: the session is gone


def test_the_dashboard_is_read_only(site):
    status, _, _ = site.post("/api/runs", b"x=1")
    assert status == 405


def test_the_json_api_serves_the_admin_apis_messages(site):
    def api(path):
        status, headers, body = site.get(path, token=TOKEN)
        assert status == 200 and headers["Content-Type"] == "application/json", body
        return json.loads(body)

    as_dict = lambda m: MessageToDict(m, preserving_proto_field_name=True)  # noqa: E731
    assert api("/api/runs") == as_dict(runs_response(site.store))
    assert api("/api/runs/1/rounds") == as_dict(rounds_response(site.store, 1))
    assert api("/api/privacy?run=1") == as_dict(privacy_ledger_message(site.store, 1))
    assert api("/api/nodes") == as_dict(pb.ListNodesResponse(nodes=NODES))
    assert api("/api/runs/2")["id"] == "2"
    assert site.get("/api/runs/99", token=TOKEN)[0] == 404
    assert site.get("/api/runs/x'%20OR%201=1", token=TOKEN)[0] == 404
    assert site.get("/api/privacy?run=0", token=TOKEN)[0] == 400


def test_every_charts_numbers_download_as_the_database_holds_them(site):
    rounds = site.store.rounds(1)
    status, headers, body = site.get("/runs/1/data/loss.csv", token=TOKEN)
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(body)))
    assert [int(r["round"]) for r in rows] == [r.number for r in rounds]
    assert [float(r["server_eval_loss"]) for r in rows] == [r.server_eval_loss for r in rounds]
    held = {p.enterprise: p.eval_loss for p in rounds[-1].participations if p.eval_loss}
    assert float(rows[-1]["heldout_loss:clinical"]) == held["clinical"]
    _, _, body = site.get("/runs/1/data/epsilon.json", token=TOKEN)
    spent = {(e["round"], e["enterprise"]): e["epsilon"] for e in json.loads(body)}
    expected = {
        (r.number, p.enterprise): p.epsilon_record for r in rounds for p in r.participations
    }
    assert spent == expected
    assert {e["target"] for e in json.loads(body)} == {8.0}
    _, _, body = site.get("/runs/1/data/cost.json", token=TOKEN)
    assert [(c["seconds"], c["bytes_up"]) for c in json.loads(body)] == [(9.5, 4096)] * 2
    _, _, body = site.get("/runs/1/data/failures.json", token=TOKEN)
    assert json.loads(body) == [
        {
            "round": 2,
            "enterprise": "finance",
            "status": "refused",
            "reason": "lifetime budget of 7.5 reached",
        }
    ]
    _, _, body = site.get("/runs/1/data/expert_load.json", token=TOKEN)
    assert json.loads(body) == [
        {"layer": "1", "expert": 0, "tokens": 6},
        {"layer": "1", "expert": 1, "tokens": 2},
    ]


def test_the_run_page_draws_the_numbers_it_tabulates(site):
    _, _, page = site.get("/runs/1", token=TOKEN)
    for r in site.store.rounds(1):
        assert (
            f'data-series="server eval" data-x="{r.number}" data-y="{r.server_eval_loss!r}"' in page
        )
    assert 'data-series="base model (server eval)" data-y="1.0"' in page
    assert 'data-series="record-level target" data-y="8.0"' in page
    assert page.count('data-layer="1"') == 2
    assert "lifetime budget of 7.5 reached" in page
    _, _, page = site.get("/nodes", token=TOKEN)
    assert "SHA256:abc" in page and "online" in page and "revoked" in page


def test_a_report_is_one_self_contained_file_with_the_run_pages_numbers(site, tmp_path):
    import base64
    import re

    from fedmoe.cli.main import main

    database = site.store.engine.url.render_as_string(hide_password=False)
    out = tmp_path / "share" / "report.html"
    assert main(["report", "1", "--out", str(out), "--database", database]) == 0
    page = out.read_text()
    assert "<script" not in page and 'src="' not in page and "/static/" not in page
    assert not re.search(r'href="(?!data:)', page)  # every link is inline data
    rounds = site.store.rounds(1)
    for r in rounds:
        assert f'data-x="{r.number}" data-y="{r.server_eval_loss!r}"' in page
    href = re.search(r'download="run-1-epsilon.csv" href="data:text/csv;base64,([^"]+)"', page)
    rows = list(csv.DictReader(io.StringIO(base64.b64decode(href.group(1)).decode())))
    assert [float(r["epsilon"]) if r["epsilon"] else None for r in rows] == [
        p.epsilon_record for r in rounds for p in r.participations
    ]
    assert main(["report", "1", "--out", str(tmp_path), "--database", database]) == 2
    assert main(["report", "9", "--out", str(out), "--database", database]) == 2


def test_the_run_page_sets_the_audits_lower_bound_beside_the_claim():
    from fedmoe.coordinator.web.pages import run_page

    run = pb.Run(id=3, status="completed", planned_rounds=1, privacy="privacy: record-level")
    ledger = pb.PrivacyLedger(
        runs=[
            pb.RunPrivacy(
                run_id=3,
                record_epsilon=8.0,
                audit_epsilon_lower_bound=0.42,
                audit_confidence=0.95,
                audit_canaries=1000,
                audit_guesses=100,
                audit_correct=60,
            )
        ]
    )
    page = run_page(run, pb.ListRoundsResponse(), ledger, user="ops")
    assert "epsilon lower bound <b>0.420</b>" in page and "the claim <b>8.000</b>" in page
    assert "does not refute the claim" in page
    ledger.runs[0].audit_epsilon_lower_bound = 9.5
    assert "REFUTES the claim" in run_page(run, pb.ListRoundsResponse(), ledger, user="ops")

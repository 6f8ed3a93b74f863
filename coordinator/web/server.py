"""The dashboard's web server: HTTPS, admin-token sign-in, read-only pages and a JSON API.

Python's own `http.server` over `ssl`, not a web framework: the dashboard is a handful of GET
routes over the store's views and one sign-in form, and everything it shows is computed by
store/views.py, so a framework would add only dependencies. Sessions live in memory (a restart
signs everyone out); the admin tokens' hashes are the coordinator's ([admin] tokens).

The JSON API is the admin API's messages as JSON (protobuf's own mapping): /api/runs,
/api/runs/N, /api/runs/N/rounds, /api/privacy[?run=N], /api/nodes. It takes the session cookie
or `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import re
import secrets
import ssl
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from google.protobuf.json_format import MessageToJson

from fedmoe.coordinator.store.db import RunStore
from fedmoe.coordinator.store.views import privacy_ledger_message, run_detail, runs_response
from fedmoe.coordinator.web import pages
from fedmoe.proto import admin_pb2 as pb

COOKIE = "fedmoe_session"
STATIC = {"dashboard.css": "text/css", "live.js": "text/javascript"}
MAX_FORM_BYTES = 4096
WRONG_TOKEN_DELAY_S = 0.5  # slows guessing; tokens are 256-bit anyway
# Nothing but this origin: no inline script, no third-party anything, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class Dashboard:
    """What the pages read: the run store, and the node registry with who is online."""

    def __init__(
        self,
        store: RunStore,
        nodes: Callable[[], list[pb.Node]],
        caller: Callable[[str], str | None],
        session_hours: float,
    ):
        self.store, self.nodes, self.caller = store, nodes, caller
        self.session_s = session_hours * 3600
        self.sessions: dict[str, tuple[str, float]] = {}  # id -> (admin name, expiry)
        self.lock = threading.Lock()

    def sign_in(self, token: str) -> str | None:
        name = self.caller(token)
        if name is None:
            return None
        session = secrets.token_urlsafe(32)
        with self.lock:
            now = time.monotonic()
            self.sessions = {k: v for k, v in self.sessions.items() if v[1] > now}
            self.sessions[session] = (name, now + self.session_s)
        return session

    def sign_out(self, session: str) -> None:
        with self.lock:
            self.sessions.pop(session, None)

    def user(self, session: str | None) -> str | None:
        with self.lock:
            found = self.sessions.get(session or "")
        return found[0] if found and found[1] > time.monotonic() else None


def _run_id(text: str) -> int:
    return int(text) if text.isdigit() and len(text) <= 10 else 0


def make_handler(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fedmoe"
        sys_version = ""
        timeout = 30  # seconds a connection may sit idle

        def log_message(self, *args) -> None:  # the coordinator's log stays readable
            pass

        # --- responses ----------------------------------------------------------------------
        def _send(self, status: int, body: str | bytes, kind: str, headers=()) -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _html(self, body: str, status: int = 200) -> None:
            self._send(status, body, "text/html; charset=utf-8")

        def _json(self, message_or_text, status: int = 200) -> None:
            text = (
                message_or_text
                if isinstance(message_or_text, str)
                else MessageToJson(message_or_text, preserving_proto_field_name=True)
            )
            self._send(status, text, "application/json")

        def _redirect(self, where: str, headers=()) -> None:
            self._send(HTTPStatus.SEE_OTHER, "", "text/plain", [("Location", where), *headers])

        def _not_found(self, api: bool, what: str = "no such page") -> None:
            if api:
                self._json(f'{{"error": "{what}"}}', HTTPStatus.NOT_FOUND)
            else:
                self._html(pages.layout("Not found", f"<p>{what}</p>", user="", live=False), 404)

        # --- who is asking ------------------------------------------------------------------
        def _session(self) -> str | None:
            for part in self.headers.get("Cookie", "").split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE:
                    return value
            return None

        def _user(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                return dashboard.caller(auth[len("Bearer ") :].strip())
            return dashboard.user(self._session())

        # --- routes -------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            path = url.path.rstrip("/") or "/"
            if path == "/signin":
                return self._html(pages.signin_page())
            if path.startswith("/static/") and path[len("/static/") :] in STATIC:
                name = path[len("/static/") :]
                asset = resources.files("fedmoe.coordinator.web").joinpath("static", name)
                return self._send(200, asset.read_bytes(), STATIC[name])
            api = path.startswith("/api/")
            user = self._user()
            if user is None:
                if api:
                    return self._json('{"error": "sign in: an admin token"}', 401)
                return self._redirect("/signin")
            if path == "/signout":
                dashboard.sign_out(self._session() or "")
                return self._redirect("/signin", [("Set-Cookie", _cookie("", 0))])
            try:
                self._route(path, parse_qs(url.query), user, api)
            except BrokenPipeError:
                pass

        def _route(self, path: str, query: dict, user: str, api: bool) -> None:
            store = dashboard.store
            if path in ("/", "/runs"):
                return self._html(pages.runs_page(runs_response(store), user))
            if path == "/nodes":
                return self._html(pages.nodes_page(dashboard.nodes(), user))
            if path == "/api/runs":
                return self._json(runs_response(store))
            if path == "/api/nodes":
                return self._json(pb.ListNodesResponse(nodes=dashboard.nodes()))
            if path == "/api/privacy":
                wanted = _run_id(query.get("run", [""])[0]) if "run" in query else None
                if wanted == 0:
                    return self._json('{"error": "run: a run number >= 1"}', 400)
                return self._json(privacy_ledger_message(store, wanted))
            match = re.fullmatch(r"/(api/)?runs/([^/]+)(/rounds|/data/(\w+)\.(csv|json))?", path)
            if not match:
                return self._not_found(api)
            run_id = _run_id(match.group(2))
            detail = run_detail(store, run_id) if run_id else None
            if detail is None:
                return self._not_found(api, f"no run {match.group(2)[:20]}")
            run, rounds = detail
            tail, chart, fmt = match.group(3), match.group(4), match.group(5)
            if api:
                if tail == "/rounds":
                    return self._json(rounds)
                return self._json(run) if tail is None else self._not_found(api)
            if tail is None:
                ledger = privacy_ledger_message(store, run_id)  # the audit beside the claim
                return self._html(pages.run_page(run, rounds, ledger, user))
            if chart is None:
                return self._not_found(api)
            tables = pages.chart_tables(run, list(rounds.rounds))
            if chart not in tables:
                return self._not_found(api, f"no chart {chart[:20]}")
            table = tables[chart]
            kind = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
            body = table.csv() if fmt == "csv" else table.json()
            disposition = f'attachment; filename="run-{run_id}-{chart}.{fmt}"'
            return self._send(200, body, kind, [("Content-Disposition", disposition)])

        def do_POST(self) -> None:
            path = urlsplit(self.path).path
            if path != "/signin":
                return self._send(HTTPStatus.METHOD_NOT_ALLOWED, "read-only", "text/plain")
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_FORM_BYTES:
                return self._html(pages.signin_page("the sign-in form is empty or too large"), 400)
            token = parse_qs(self.rfile.read(length).decode(errors="replace")).get("token", [""])[0]
            session = dashboard.sign_in(token.strip())
            if session is None:
                time.sleep(WRONG_TOKEN_DELAY_S)
                return self._html(pages.signin_page("unknown token: nothing was signed in"), 401)
            cookie = _cookie(session, int(dashboard.session_s))
            return self._redirect("/runs", [("Set-Cookie", cookie)])

    return Handler


def _cookie(value: str, max_age: int) -> str:
    return f"{COOKIE}={value}; Max-Age={max_age}; Path=/; Secure; HttpOnly; SameSite=Strict"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that drops the connection or refuses our certificate is its own business;
        # anything else is a bug worth a traceback.
        if not isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class DashboardServer:
    """Serves `dashboard` on `address` over TLS until stopped."""

    def __init__(self, dashboard: Dashboard, address: str, certfile: str, keyfile: str):
        host, port = address.rsplit(":", 1)
        self.httpd = _Server((host.strip("[]"), int(port)), make_handler(dashboard))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile, keyfile)
        # The handshake happens in each request's thread: a stalled client never blocks accept.
        self.httpd.socket = context.wrap_socket(
            self.httpd.socket, server_side=True, do_handshake_on_connect=False
        )
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> DashboardServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

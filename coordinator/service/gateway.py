"""The fleet gateway: the only port of the coordinator that enterprise agents reach.

Flower's SuperLink serves its Fleet API (what SuperNodes call), its Control API (runs, node
registration, logs) and the ServerApp's Runtime API on ONE port, and in the open-source edition
the Control API has no authentication: whoever reaches it can submit a run, which is code the
coordinator then executes, or register and unregister nodes. So the SuperLink listens on loopback
only, and this gateway publishes its Fleet API and nothing else: it terminates TLS with the
coordinator's certificate and forwards `/v1/fleet/*` (and `/health`) unchanged, headers included,
so Flower's SuperNode authentication (a signature per request) is checked by the SuperLink as
before. Every other path is a 404 that never reaches the SuperLink.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
MAX_BODY_BYTES = 64 << 20  # Flower moves large arrays in chunks of a few MiB
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "te",
    "trailer",
}


def allowed(path: str) -> bool:
    return path.startswith(FLEET_PREFIX) or path == "/health"


def make_app(upstream: str, ca: Path) -> Starlette:
    client = httpx.AsyncClient(
        base_url=f"https://{upstream}",
        verify=ssl.create_default_context(cafile=str(ca)),
        timeout=None,
    )

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not allowed(path):
            return Response("not found", status_code=404)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return Response("request too large", status_code=413)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            upstream_response = await client.request(
                request.method, path, params=request.query_params, content=body, headers=headers
            )
        except httpx.HTTPError:
            return Response("the SuperLink is not reachable", status_code=503)
        out_headers = {
            k: v
            for k, v in upstream_response.headers.items()
            if k.lower() not in HOP_BY_HOP | {"content-encoding"}
        }
        return Response(
            upstream_response.content,
            status_code=upstream_response.status_code,
            headers=out_headers,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    return Starlette(
        routes=[Route("/{path:path}", forward, methods=["GET", "POST"])], lifespan=lifespan
    )


class FleetGateway:
    """The gateway's HTTPS server, in a thread of the coordinator's process."""

    def __init__(self, host: str, port: int, upstream: str, ca: Path, cert: Path, key: Path):
        config = uvicorn.Config(
            make_app(upstream, ca),
            host=host,
            port=port,
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="fleet-gateway", daemon=True)

    def _serve(self) -> None:
        asyncio.run(self.server.serve())

    def start(self, timeout: float = 30.0) -> FleetGateway:
        self.thread.start()
        deadline = timeout
        while not self.server.started and self.thread.is_alive() and deadline > 0:
            threading.Event().wait(0.05)
            deadline -= 0.05
        if not self.server.started:
            raise RuntimeError("the fleet gateway did not start (is its address free?)")
        return self

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

"""Flower's SuperLink, started and supervised by us: its process, its Control API, runs on it.

We start the SuperLink ourselves (never `flwr run`'s managed local one, which outlives the CLI, is
shared by everything on its fixed port and builds a fresh environment per run unless started
with "no runtime dependency installation"). Its Control API, which in the open-source edition has
no authentication and accepts runs (code to execute) from anyone who reaches it, is bound to
loopback: only this host's coordinator talks to it (see gateway.py for what enterprises reach).

Every process we start dies with us (PR_SET_PDEATHSIG on Linux, and a process-group stop on a
clean exit); the SuperLink's own SuperExec and ServerApp processes watch their parent.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fedmoe.coordinator.round.flower_run import LOG_END, FlowerRun
from fedmoe.support.processes import (
    executable,
    flower_env,
    free_port,
    start_process,
    stop_process_group,
)

# The Flower app we submit: a pyproject.toml alone, shipped inside fedmoe (not the checkout's, whose
# `flwr run .` is refused: support/flwr_run_refusal).
APP_DIR = Path(__file__).resolve().parents[1] / "flower_app"
CONNECTION = "fedmoe"  # the name of our SuperLink in $FLWR_HOME/config.toml
FINISHED = "finished"  # Flower's status of a run that ended, whatever the outcome
STOP_GRACE_S = 3.0
LATE_LOG_S = 15.0


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the CA that signed the server certificate, and the server's certificate and key."""

    ca: Path
    cert: Path
    key: Path


def write_connection(home: Path, address: str, ca: Path | None) -> None:
    """$FLWR_HOME/config.toml naming the SuperLink that `flwr` talks to."""
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{ca}"\n' if ca else "insecure = true\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}'
    )


class SuperLink:
    """One `flower-superlink` process on loopback: simulation runtime, or the deployment engine
    with TLS and SuperNode authentication; with a state database so runs and registered nodes
    survive its restart."""

    def __init__(
        self,
        home: Path,
        port: int | None = None,
        simulation: bool = False,
        tls: TLSFiles | None = None,
        node_auth: bool = False,
        database: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        if node_auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS")
        self.home = home
        self.port = port or free_port()
        self.simulation = simulation
        self.tls = tls
        self.node_auth = node_auth
        self.database = database or home / "state.db"
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0  # wall-clock time of the last start
        self._control: Control | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [executable("flower-superlink"), "--disable-runtime-dependency-installation"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.database)]
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert)]
            cmd += ["--ssl-keyfile", str(self.tls.key)]
        else:
            cmd += ["--insecure"]
        cmd += ["--enable-supernode-auth"] if self.node_auth else []
        cmd += ["--simulation"] if self.simulation else []
        return cmd

    def start(self, timeout: float = 90.0) -> SuperLink:
        write_connection(self.home, self.address, self.tls.ca if self.tls else None)
        self.database.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        self.proc = start_process(
            self.command(), flower_env(self.home, **self.env), self.home / "superlink.log"
        )
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.home / "superlink.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(
                    f"Flower SuperLink did not start; its log ({self.home / 'superlink.log'}) ends:\n{tail}"
                )
            time.sleep(0.2)
        return self

    def healthy(self) -> bool:
        scheme = "https" if self.tls else "http"
        context = ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls else None
        try:
            with urllib.request.urlopen(
                f"{scheme}://{self.address}/health", timeout=2, context=context
            ):
                return True
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def control(self) -> Control:
        if self._control is None:
            self._control = Control(self.home, self.address, self.tls.ca if self.tls else None)
        return self._control

    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.proc is not None:
            # Its HTTP server would wait for idle keep-alive connections to close; its state is in
            # a transactional database, so a short grace loses nothing.
            stop_process_group(self.proc, grace=STOP_GRACE_S)
            self.proc = None

    def __enter__(self) -> SuperLink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Control:
    """Flower's Control API of our SuperLink, called in-process (no `flwr` process per call)."""

    def __init__(self, home: Path, address: str, ca: Path | None):
        self.home, self.address, self.ca = home, address, ca
        self._client = None

    def _stub(self):
        if self._client is None:
            from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
            from flwr.supercore.control import ControlHttpClient
            from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

            self._client = ControlHttpClient.from_server_address(
                server_address=self.address,
                insecure=self.ca is None,
                root_certificates=self.ca.read_bytes() if self.ca else None,
                interceptors=[
                    CliClientHttpInterceptor(),
                    RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
                ],
            )
        return self._client

    def run_status(self, flower_run_id: str) -> tuple[str, str, str]:
        """(status, sub_status, details) of a Flower run, e.g. ("finished", "failed", "...")."""
        from flwr.proto.control_pb2 import ListRunsRequest

        response = self._stub().ListRuns(ListRunsRequest(run_id=int(flower_run_id)))
        run = response.run_dict.get(int(flower_run_id))
        if run is None:
            return ("unknown", "", "the SuperLink does not know this run")
        return (run.status.status, run.status.sub_status, run.status.details)

    def stop_run(self, flower_run_id: str) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        with contextlib.suppress(Exception):  # already finished: nothing to stop
            self._stub().StopRun(StopRunRequest(run_id=int(flower_run_id)))

    def logs(self, flower_run_id: str, after: float) -> Iterator[tuple[str, float]]:
        """(log text, its timestamp) of a run from `after` on, until the run ends or the stream breaks."""
        from flwr.proto.control_pb2 import StreamLogsRequest

        request = StreamLogsRequest(run_id=int(flower_run_id), after_timestamp=after)
        for res in self._stub().StreamLogs(request):
            yield res.log_output, res.latest_timestamp

    def register_node(self, public_key: bytes, name: str) -> int:
        from flwr.proto.control_pb2 import RegisterNodeRequest

        return int(
            self._stub().RegisterNode(RegisterNodeRequest(public_key=public_key, name=name)).node_id
        )

    def unregister_node(self, node_id: int) -> None:
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        self._stub().UnregisterNode(UnregisterNodeRequest(node_id=node_id))

    def heard_from_since(self, moment: float) -> set[int]:
        """Nodes that reached the SuperLink after `moment` (a heartbeat or a reconnection): after
        a SuperLink restart, the ones that are really back (its state database still lists the
        others as online until their last heartbeat expires)."""
        from flwr.common.constant import HEARTBEAT_PATIENCE
        from flwr.proto.control_pb2 import ListNodesRequest

        nodes = self._stub().ListNodes(ListNodesRequest()).nodes_info
        return {
            n.node_id
            for n in nodes
            if n.HasField("online_until")
            and n.online_until - HEARTBEAT_PATIENCE * n.heartbeat_interval >= moment
        }

    def online_nodes(self) -> set[int]:
        from flwr.proto.control_pb2 import ListNodesRequest

        now = time.time()
        nodes = self._stub().ListNodes(ListNodesRequest()).nodes_info
        return {
            n.node_id
            for n in nodes
            if n.status == "online" or (n.HasField("online_until") and n.online_until > now)
        }

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None


def write_run_config(values: dict, path: Path) -> Path:
    """Run config values as a TOML file for `flwr run --run-config` (JSON strings and numbers are
    valid TOML)."""
    path.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in values.items()))
    return path


def submit_app(
    home: Path, app_dir: Path, run_config: dict, name: str, federation_config: str | None = None
) -> str:
    """`flwr run` the Flower app in `app_dir` on the SuperLink named in `home`; returns the Flower
    run id."""
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"the Flower app (pyproject.toml) is not in {app_dir}: reinstall fedmoe"
        )
    overrides = write_run_config(run_config, home / f"{name}.toml")
    args = [
        executable("flwr"),
        "run",
        str(app_dir),
        CONNECTION,
        "--run-config",
        str(overrides),
        "--format",
        "json",
    ]
    args += ["--federation-config", federation_config] if federation_config else []
    out = subprocess.run(
        args, env=flower_env(home), capture_output=True, text=True, cwd=app_dir, timeout=300
    )
    try:
        submitted = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"flwr run failed: {out.stdout[-2000:]}{out.stderr[-2000:]}") from None
    if "run-id" not in submitted:
        raise RuntimeError(f"Flower refused the run: {submitted.get('error-message', submitted)}")
    return str(submitted["run-id"])


def submit_run(home: Path, flower_run: FlowerRun, federation_config: str | None = None) -> str:
    """Submit one Flower run carrying fedmoe run `flower_run.run_id`."""
    return submit_app(
        home, APP_DIR, flower_run.to_run_config(), f"run-{flower_run.run_id}", federation_config
    )


def follow_logs(
    control: Control, flower_run_id: str, on_text: Callable[[str], None], done: Callable[[], bool]
) -> None:
    """Stream a run's log to `on_text`, re-attaching after a broken stream (from the last
    timestamp seen, so nothing is printed twice) until `done()`. Flower may push a ServerApp's
    last lines after it marks the run finished (its uploader lags under load), so a finished
    run's log is drained again until its `LOG_END` line or for `LATE_LOG_S`."""
    after, finished_at = 0.0, None
    while True:
        if finished_at is None and done():
            finished_at = time.monotonic()
        try:
            for text, stamp in control.logs(flower_run_id, after):
                on_text(text)
                after = max(after, stamp)
                if LOG_END in text:
                    return
        except Exception:  # noqa: BLE001 - a broken stream is re-attached, never fatal
            pass
        if finished_at is not None and time.monotonic() - finished_at > LATE_LOG_S:
            return
        time.sleep(0.5)

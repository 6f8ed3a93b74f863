"""A whole deployment on loopback, as real processes: `fedmoe coordinator` and one `fedmoe agent`
per enterprise, TLS with development certificates, registered node keys, the admin API.
Used by the end-to-end deployment tests and benchmarks/deployment.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from fedmoe.client.keys import make_node_keys
from fedmoe.coordinator.service.certs import make_dev_certificates
from fedmoe.coordinator.service.service_config import new_admin_token
from fedmoe.proto import admin_pb2 as pb
from fedmoe.proto import admin_pb2_grpc as pb_grpc

FEDMOE = [sys.executable, "-m", "fedmoe.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, kill: bool) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class Loopback:
    def __init__(self, root: Path, database_url: str | None = None, poll_interval_s: float = 0.2):
        self.root = root
        self.certs = root / "certs"
        make_dev_certificates(self.certs, [])
        self.token, token_lines = new_admin_token("ops")
        self.agents_port, self.admin_port = free_port(), free_port()
        self.database_url = database_url or f"sqlite:///{root / 'state' / 'fedmoe.db'}"
        self.poll_interval_s = poll_interval_s
        (root / "coordinator.toml").write_text(
            f'[agents]\naddress = "127.0.0.1:{self.agents_port}"\n'
            f'[admin]\naddress = "127.0.0.1:{self.admin_port}"\n{token_lines}'
            '[tls]\nca = "certs/ca.pem"\ncertificate = "certs/server.pem"\nkey = "certs/server.key"\n'
            f'[database]\nurl = "{self.database_url}"\n[storage]\ndir = "state"\n[runs]\npoll_interval_s = 0.5\n'
        )
        self.coordinator: subprocess.Popen | None = None
        self.agents: dict[str, subprocess.Popen] = {}
        self._channel = grpc.secure_channel(
            f"127.0.0.1:{self.admin_port}",
            grpc.ssl_channel_credentials((self.certs / "ca.pem").read_bytes()),
        )
        self.stub = pb_grpc.AdminStub(self._channel)
        self.metadata = [("authorization", f"Bearer {self.token}")]

    # --- processes ------------------------------------------------------------------------------
    def _spawn(self, args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "ab") as out:
            return subprocess.Popen(
                [*FEDMOE, *args],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_coordinator(self, timeout: float = 60.0) -> None:
        self.coordinator = self._spawn(
            ["coordinator", "--config", "coordinator.toml"],
            self.root,
            self.root / "coordinator.log",
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.call("ListRuns", pb.ListRunsRequest(), timeout=2)
                return
            except grpc.RpcError:
                if self.coordinator.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "coordinator did not start:\n" + self.log("coordinator")[-3000:]
                    ) from None
                time.sleep(0.3)

    def stop_coordinator(self, kill: bool = False) -> None:
        _stop(self.coordinator, kill)

    def add_agent(
        self, name: str, data: Path, budget: dict | None = None, key_dir: Path | None = None
    ) -> Path:
        """An agent folder with its own key pair and agent.toml (not registered, not started)."""
        folder = self.root / "agents" / name
        keys = key_dir or folder / "keys"
        if not (keys / "node.key").exists():
            make_node_keys(keys)
        budget_lines = "".join(f"{k} = {v}\n" for k, v in (budget or {}).items())
        (folder / "agent.toml").write_text(
            f'name = "{name}"\ncoordinator = "127.0.0.1:{self.agents_port}"\nca_certificate = "{self.certs / "ca.pem"}"\n'
            f'private_key = "{keys / "node.key"}"\ndata = "{data}"\npoll_interval_s = {self.poll_interval_s}\n'
            + (f"[budget]\n{budget_lines}" if budget_lines else "")
        )
        return folder

    def pin_federation(self, names: list[str]) -> Path:
        """Every named agent pins the public keys of all of them (its SecAgg+ federation)."""
        pinned = self.root / "agents" / "federation.pub"
        pinned.write_text(
            "".join((self.root / "agents" / n / "keys" / "node.pub").read_text() for n in names)
        )
        for name in names:
            toml = self.root / "agents" / name / "agent.toml"
            toml.write_text(f'federation_keys = "{pinned}"\n' + toml.read_text())
        return pinned

    def register(self, name: str, key_dir: Path | None = None) -> pb.Node:
        key = ((key_dir or self.root / "agents" / name / "keys") / "node.pub").read_text()
        return self.call("RegisterNode", pb.RegisterNodeRequest(enterprise=name, public_key=key))

    def start_agent(self, name: str) -> None:
        folder = self.root / "agents" / name
        self.agents[name] = self._spawn(
            ["agent", "--config", "agent.toml", "--new-ledger"], folder, folder / "agent.log"
        )

    def stop_agent(self, name: str, kill: bool = False) -> None:
        _stop(self.agents[name], kill)

    def log(self, who: str) -> str:
        path = (
            self.root / "coordinator.log"
            if who == "coordinator"
            else self.root / "agents" / who / "agent.log"
        )
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for proc in self.agents.values():
            _stop(proc, kill=True)
        if self.coordinator is not None:
            _stop(self.coordinator, kill=False)
        self._channel.close()

    # --- the admin API ----------------------------------------------------------------------------
    def call(self, method: str, request, timeout: float = 120.0, metadata=None):
        return getattr(self.stub, method)(
            request, metadata=self.metadata if metadata is None else metadata, timeout=timeout
        )

    def wait_online(self, names: list[str], timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            nodes = {
                n.enterprise: n.online for n in self.call("ListNodes", pb.ListNodesRequest()).nodes
            }
            if all(nodes.get(n) for n in names):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"agents not online after {timeout}s: {nodes}")
            time.sleep(0.5)

    def start_run(self, config_toml: str = "", overrides: tuple[str, ...] = ()) -> pb.Run:
        return self.call(
            "StartRun", pb.StartRunRequest(config_toml=config_toml, overrides=list(overrides))
        )

    def watch(self, run_id: int, timeout: float = 600.0) -> list[pb.RunEvent]:
        stream = self.stub.WatchRun(
            pb.WatchRunRequest(run_id=run_id), metadata=self.metadata, timeout=timeout
        )
        return list(stream)

    def wait_for(self, run_id: int, statuses: tuple[str, ...], timeout: float = 600.0) -> pb.Run:
        deadline = time.monotonic() + timeout
        while True:
            run = self.call("GetRun", pb.GetRunRequest(run_id=run_id))
            if run.status in statuses:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"run {run_id} is {run.status} after {timeout}s, wanted {statuses}"
                )
            time.sleep(0.5)

    def wait_for_round(self, run_id: int, number: int, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.call("ListRounds", pb.ListRoundsRequest(run_id=run_id)).rounds) < number:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"run {run_id} has not committed round {number} after {timeout}s"
                )
            time.sleep(0.3)


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line or environment names `text` (a test's folder): what a test
    started, children included, wherever they were reparented."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(int(proc.name))
    return found

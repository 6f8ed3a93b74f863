"""`fedmoe coordinator --config coordinator.toml`: the long-lived coordinator service.

A small supervisor around Flower's deployment engine:
- Flower's SuperLink (TLS, SuperNode authentication, no runtime dependency installation, its own
  state database) on loopback, restarted if it dies;
- the fleet gateway (gateway.py): the one port agents reach, Flower's Fleet API only;
- the admin API (admin_api.py): start, stop and watch runs, read rounds and the privacy ledger,
  register and revoke enterprise nodes;
- the run database, and a loop that carries every run to its end (runs.py): runs left `running`
  by a previous coordinator are resumed from their last committed round when it starts.
Many runs can be in flight at once; each is its own Flower run and its own row.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from fedmoe.contract.keys import fingerprint, load_public_key
from fedmoe.coordinator.admin_api import AdminError, serve
from fedmoe.coordinator.config import (
    ENTERPRISE_NAME,
    apply_overrides,
    parse_overrides,
    parse_run_config,
    resolve_for_deployment,
)
from fedmoe.coordinator.db import FINAL_STATUSES, RunStore
from fedmoe.coordinator.gateway import FleetGateway
from fedmoe.coordinator.runs import RunSupervisor
from fedmoe.coordinator.service_config import CoordinatorConfig
from fedmoe.coordinator.superlink import FINISHED, SuperLink, TLSFiles, follow_logs
from fedmoe.coordinator.views import node_message, privacy_plan_summary
from fedmoe.proto import admin_pb2 as pb
from fedmoe.support.files import ConfigError, parse_toml
from fedmoe.support.processes import Stopped, stop_on_signals

HEALTH_FILE = "health.json"
COORDINATOR_SECTIONS = ("database", "output")  # a deployment run's: the coordinator's own


class CoordinatorService:
    def __init__(self, config: CoordinatorConfig, say=print):
        import grpc

        self.grpc = grpc
        self.config = config
        self.say = lambda text: say(f"[coordinator {time.strftime('%H:%M:%S')}] {text}", flush=True)
        self.lock = threading.RLock()  # one supervisor step at a time (admin calls and the loop)
        self.storage = Path(config.storage.dir)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.store = RunStore(config.database.url)
        tls = TLSFiles(Path(config.tls.ca), Path(config.tls.certificate), Path(config.tls.key))
        self.superlink = SuperLink(
            config.flower_home, tls=tls, node_auth=True, database=self.storage / "superlink.db"
        )
        self.supervisor = RunSupervisor(
            self.store, self.superlink, "deployment", config.database.url, config.runs.max_resumes
        )
        self.gateway: FleetGateway | None = None
        self.admin_server = None
        self.followed: set[str] = set()

    # --- admin actions ------------------------------------------------------------------------
    def start_run(self, config_toml: str, overrides: list[str], caller: str) -> int:
        data = parse_toml(config_toml, "config_toml")
        for section in COORDINATOR_SECTIONS:
            if section in data:
                raise ConfigError(
                    f"{section}: set by the coordinator (coordinator.toml), not by a run; remove [{section}]"
                )
        apply_overrides(data, parse_overrides(overrides))
        for section in COORDINATOR_SECTIONS:
            if section in data:
                raise ConfigError(f"{section}: set by the coordinator, not by a run")
        config = parse_run_config(data, "config_toml")
        registered = [n.enterprise for n in self.store.nodes()]
        config = resolve_for_deployment(
            config, registered, self.config.database.url, str(self.config.runs_dir)
        )
        names = [e.name for e in config.federation.enterprises]
        with self.lock:
            run_id = self.store.create_run(
                config.to_toml_dict(),
                config.federation.rounds,
                "deployment",
                names,
                caller,
                privacy_plan_summary(config),
            )
            self.say(
                f"run {run_id} started by {caller}: {len(names)} enterprises ({', '.join(names)}), {config.federation.rounds} rounds"
            )
            self._check(run_id)
        return run_id

    def stop_run(self, run_id: int, caller: str) -> None:
        with self.lock:
            self.supervisor.stop(run_id, f"stopped by {caller}")
        self.say(f"run {run_id} stopped by {caller}")

    def register_node(self, enterprise: str, public_key: str, caller: str) -> pb.Node:
        import re

        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        code = self.grpc.StatusCode
        if not re.match(ENTERPRISE_NAME, enterprise or ""):
            raise AdminError(
                code.INVALID_ARGUMENT,
                "enterprise: 1-64 letters, digits, `_`, `.`, `-`, starting with a letter or digit",
            )
        try:
            key = load_public_key(public_key)
        except ValueError as err:
            raise AdminError(code.INVALID_ARGUMENT, str(err)) from None
        digest = fingerprint(key)
        with self.lock:
            if (known := self.store.node_by_key(digest)) is not None:
                state = (
                    "revoked keys never come back"
                    if known.revoked_at
                    else f"it belongs to {known.enterprise}"
                )
                raise AdminError(
                    code.ALREADY_EXISTS,
                    f"public_key: {digest} was registered before ({state}); make a new key with `fedmoe agent init`",
                )
            if any(n.enterprise == enterprise for n in self.store.nodes()):
                raise AdminError(
                    code.ALREADY_EXISTS,
                    f"enterprise: {enterprise} already has an active key; revoke it first",
                )
            node_id = self.superlink.control().register_node(public_key_to_bytes(key), enterprise)
            try:
                node = self.store.register_node(
                    enterprise, public_key.strip(), digest, str(node_id), caller
                )
            except Exception:
                self.superlink.control().unregister_node(node_id)
                raise
        self.say(f"enterprise {enterprise} registered by {caller} (key {digest})")
        return node_message(node, online=False)

    def revoke_node(self, enterprise: str, caller: str) -> pb.Node:
        with self.lock:
            active = [n for n in self.store.nodes() if n.enterprise == enterprise]
            if not active:
                raise LookupError(
                    f"enterprise {enterprise!r} has no active key; ListNodes lists them"
                )
            self.superlink.control().unregister_node(int(active[0].flower_node_id))
            node = self.store.revoke_node(enterprise, caller)
        self.say(
            f"enterprise {enterprise} revoked by {caller}: its node is disconnected and its key refused"
        )
        return node_message(node, online=False)

    def nodes(self, include_revoked: bool) -> list[pb.Node]:
        try:
            online = self.superlink.control().online_nodes()
        except Exception:  # noqa: BLE001 - the registry is still worth showing
            online = set()
        return [
            node_message(n, int(n.flower_node_id) in online)
            for n in self.store.nodes(include_revoked)
        ]

    def refused_admin_call(self, method: str) -> None:
        self.say(f"refused an admin call without a valid token ({method})")

    # --- supervision --------------------------------------------------------------------------
    def _check(self, run_id: int) -> None:
        run = self.supervisor.check(run_id)
        # Only Flower runs of this coordinator's SuperLink: an earlier one's log would replay.
        fresh = run.flower_run_id in self.supervisor.submitted
        if fresh and run.flower_run_id not in self.followed and run.status not in FINAL_STATUSES:
            self.followed.add(run.flower_run_id)
            self._follow(run_id, run.flower_run_id)

    def _follow(self, run_id: int, flower_run_id: str) -> None:
        """Print the run's progress lines and keep its whole ServerApp log in storage/logs/."""
        control = self.superlink.control()
        log_path = self.storage / "logs" / f"run-{run_id:04d}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)

        def on_text(text: str) -> None:
            with open(log_path, "a") as log:
                log.write(text)
            for line in text.splitlines():
                if "[fedmoe]" in line:
                    self.say(line[line.find("[fedmoe]") + len("[fedmoe] ") :])

        def done() -> bool:
            return not self.superlink.alive() or control.run_status(flower_run_id)[0] == FINISHED

        threading.Thread(
            target=follow_logs, args=(control, flower_run_id, on_text, done), daemon=True
        ).start()

    def supervise_once(self) -> None:
        with self.lock:
            if not self.superlink.alive():
                self.say("the SuperLink stopped; restarting it (running runs will resume)")
                self.superlink.stop()
                self.superlink.start()
                self.supervisor.submitted.clear()
            for run in self.store.runs(statuses=("queued", "running")):
                if run.engine == "deployment":
                    try:
                        self._check(run.id)
                    except Exception as err:  # noqa: BLE001 - one run's trouble must not stop the others
                        self.say(
                            f"run {run.id}: supervision step failed ({type(err).__name__}: {err}); retrying"
                        )
        self._write_health()

    def _write_health(self) -> None:
        health = {
            "at": time.time(),
            "superlink": self.superlink.alive(),
            "gateway": self.gateway is not None and self.gateway.alive(),
        }
        tmp = self.storage / f".{HEALTH_FILE}.tmp"
        tmp.write_text(json.dumps(health))
        tmp.replace(self.storage / HEALTH_FILE)

    def start(self) -> None:
        c = self.config
        self.superlink.start()
        host, port = c.agents.address.rsplit(":", 1)
        tls = self.superlink.tls
        self.gateway = FleetGateway(
            host.strip("[]"), int(port), self.superlink.address, tls.ca, tls.cert, tls.key
        ).start()
        self.admin_server = serve(
            self, c.admin.address, tls.cert.read_bytes(), tls.key.read_bytes()
        )
        self.say(
            f"ready: agents connect to {c.agents.address} (TLS, registered keys only); admin API at {c.admin.address}; "
            f"runs in {c.database.url.split('@')[-1]}"
        )

    def stop(self) -> None:
        if self.admin_server is not None:
            self.admin_server.stop(grace=2).wait()
        if self.gateway is not None:
            self.gateway.stop()
        self.superlink.stop()
        self.store.close()

    def serve_forever(self) -> int:
        try:
            with stop_on_signals():
                self.start()
                while True:
                    self.supervise_once()
                    time.sleep(self.config.runs.poll_interval_s)
        except Stopped as name:
            running = [r.id for r in self.store.runs(statuses=("queued", "running"))]
            self.say(
                f"stopping ({name}); runs {running or 'none'} resume when the coordinator starts again"
            )
            return 0
        finally:
            self.stop()


def coordinator_health(config: CoordinatorConfig, max_age_s: float = 30.0) -> tuple[bool, str]:
    path = Path(config.storage.dir) / HEALTH_FILE
    try:
        health = json.loads(path.read_text())
    except (OSError, ValueError):
        return False, f"no health file at {path}: is `fedmoe coordinator` running?"
    age = time.time() - float(health.get("at", 0))
    if age > max_age_s:
        return False, f"the coordinator's health file is {age:.0f}s old: it is not running"
    if not (health.get("superlink") and health.get("gateway")):
        return False, f"not ready: {health}"
    return True, "ok: SuperLink and agents' gateway up"

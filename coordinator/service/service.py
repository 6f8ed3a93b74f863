"""`fedmoe coordinator --config coordinator.toml`: the long-lived coordinator service.

A small supervisor around Flower's deployment engine:
- Flower's SuperLink (TLS, SuperNode authentication, no runtime dependency installation, its own
  state database) on loopback, restarted if it dies;
- the fleet gateway (gateway.py): the one port agents reach, Flower's Fleet API only;
- the admin API (admin_api.py): start, stop and watch runs, read rounds and the privacy ledger,
  register and revoke enterprise nodes, export a run's adapter and generate text with it;
- the run database, and a loop that carries every run to its end (runs.py): runs left `running`
  by a previous coordinator are resumed from their last committed round when it starts.
Many runs can be in flight at once; each is its own Flower run and its own row.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path

from fedmoe.contract.keys import fingerprint, load_public_key
from fedmoe.coordinator.config import (
    ENTERPRISE_NAME,
    apply_overrides,
    parse_overrides,
    parse_run_config,
    resolve_for_deployment,
)
from fedmoe.coordinator.round.flower_run import DATABASE_ENV
from fedmoe.coordinator.service.admin_api import AdminError, serve
from fedmoe.coordinator.service.gateway import FleetGateway
from fedmoe.coordinator.service.metrics import MetricsServer, coordinator_registry, serve_metrics
from fedmoe.coordinator.service.runs import RunSupervisor
from fedmoe.coordinator.service.service_config import CoordinatorConfig
from fedmoe.coordinator.service.superlink import FINISHED, SuperLink, TLSFiles, follow_logs
from fedmoe.coordinator.store.db import FINAL_STATUSES, RunStore
from fedmoe.coordinator.store.run_folders import check_output_dir
from fedmoe.coordinator.store.views import node_message, privacy_plan_summary
from fedmoe.coordinator.web.server import Dashboard, DashboardServer
from fedmoe.proto import admin_pb2 as pb
from fedmoe.support.files import MIN_FREE_BYTES, ConfigError, parse_toml, unwritable
from fedmoe.support.processes import Stopped, stop_on_signals
from fedmoe.support.words import plural, run_list

HEALTH_FILE = "health.json"
COORDINATOR_SECTIONS = ("database", "output")  # a deployment run's: the coordinator's own
SIMULATION_CONFIG_HINT = (
    "  (a config for `fedmoe run`, the simulation? A deployment run names no data, budgets, "
    "ledgers, database or output: the agents and the coordinator hold those; see deploy/run.toml)"
)
EXPORT_FORMATS = ("peft", "merged", "checkpoint")
EXPORTS_DIR = "exports"  # under storage: exports being streamed, cleared when the service starts
PROMPT_MAX_CHARS = 8192
MAX_NEW_TOKENS = 1024
DEFAULT_MAX_NEW_TOKENS = 48
MAX_TEMPERATURE = 10.0


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
            config.flower_home,
            tls=tls,
            node_auth=True,
            database=self.storage / "superlink.db",
            env={DATABASE_ENV: config.database.url},  # to the ServerApp, never to a node
        )
        self.supervisor = RunSupervisor(
            self.store, self.superlink, "deployment", config.database.url, config.runs.max_resumes
        )
        self.gateway: FleetGateway | None = None
        self.admin_server = None
        self.metrics: MetricsServer | None = None
        self.dashboard: DashboardServer | None = None
        self.followed: set[str] = set()
        # One model at a time in this process for exports and generation (memory), apart from the
        # supervision lock: a long export never holds up runs or other admin calls.
        self.model_lock = threading.Lock()

    # --- admin actions ------------------------------------------------------------------------
    def start_run(self, config_toml: str, overrides: list[str], caller: str) -> int:
        data = parse_toml(config_toml, "config_toml")
        apply_overrides(data, parse_overrides(overrides))
        # Every problem at once: a simulation's config (fedmoe run) has several of them.
        problems = [
            f"  {section}: set by the coordinator (coordinator.toml), not by a run; "
            f"remove [{section}]"
            for section in COORDINATOR_SECTIONS
            if data.pop(section, None) is not None
        ]
        registered = [n.enterprise for n in self.store.nodes()]
        try:
            config = resolve_for_deployment(
                parse_run_config(data, "config_toml"),
                registered,
                self.config.database.url,
                str(self.config.runs_dir),
            )
        except ConfigError as err:
            lines = str(err).splitlines()
            problems += lines[1:] if lines[0].startswith("invalid run config") else [f"  {err}"]
        if problems:
            if any("not by a run" in p or "enterprise's agent" in p for p in problems):
                problems.append(SIMULATION_CONFIG_HINT)
            raise ConfigError("invalid run config:\n" + "\n".join(problems))
        names = [e.name for e in config.federation.enterprises]
        check_output_dir(self.config.runs_dir, {r.id: r.uid for r in self.store.runs()})
        if (problem := unwritable(Path(self.config.runs_dir), MIN_FREE_BYTES)) is not None:
            # Checked again before every round: no node is charged for a round that cannot commit.
            raise AdminError(self.grpc.StatusCode.FAILED_PRECONDITION, f"storage.dir: {problem}")
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
                f"run {run_id} started by {caller}: {plural(len(names), 'enterprise')} "
                f"({', '.join(names)}), {plural(config.federation.rounds, 'round')}"
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
        import re

        if not re.match(ENTERPRISE_NAME, enterprise or ""):  # never echo a 100 KB name back
            raise AdminError(
                self.grpc.StatusCode.INVALID_ARGUMENT,
                f"enterprise: 1-64 letters, digits, `_`, `.`, `-` (got {len(enterprise)} "
                f"characters starting {enterprise[:40]!r})",
            )
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

    def export_run(
        self, run_id: int, round_number: int, fmt: str
    ) -> tuple[Path, pb.ExportManifest]:
        """Build a run's export as `fedmoe export` would, in a fresh folder under
        storage/exports/ (the caller streams it, then removes it): (folder, manifest)."""
        from fedmoe.coordinator.store.artifacts import export, resolve_adapter
        from fedmoe.model.base import base_bytes, resolve_model_path
        from fedmoe.model.settings import BaseLoading

        code = self.grpc.StatusCode
        fmt = fmt or "peft"
        if fmt not in EXPORT_FORMATS:
            raise AdminError(
                code.INVALID_ARGUMENT, f"format: one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})"
            )
        found, model_path, note = resolve_adapter(self.store, run_id, round_number or None)
        if found is None:
            raise AdminError(
                code.FAILED_PRECONDITION,
                f"run {run_id} has no adapter to export: {note}; name a round (`--round N`) to "
                "export one anyway",
            )
        checkpoint = self._checked_checkpoint(run_id, found)
        limit = self.config.admin.max_export_bytes
        if fmt == "merged":  # refuse before building what could not be sent
            estimate = base_bytes(resolve_model_path(model_path), BaseLoading())
            if estimate > limit:
                raise AdminError(code.RESOURCE_EXHAUSTED, _too_big(run_id, fmt, estimate, limit))
        exports = self.storage / EXPORTS_DIR
        exports.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"run-{run_id:04d}-{fmt}-", dir=exports))
        try:
            out = folder / "out"
            with self.model_lock:
                if fmt == "checkpoint":
                    shutil.copytree(checkpoint, out)
                else:
                    export(model_path, checkpoint, out, merge=fmt == "merged")
            files = [
                pb.ExportFile(
                    path=f.relative_to(out).as_posix(), size=f.stat().st_size, sha256=_sha256(f)
                )
                for f in sorted(out.rglob("*"))
                if f.is_file()
            ]
            total = sum(f.size for f in files)
            if total > limit:
                raise AdminError(code.RESOURCE_EXHAUSTED, _too_big(run_id, fmt, total, limit))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        manifest = pb.ExportManifest(
            run_id=run_id,
            round=found.number,
            format=fmt,
            base_model=str(model_path),
            files=files,
            total_bytes=total,
        )
        self.say(f"run {run_id} round {found.number} exported ({fmt}, {total:,} bytes)")
        return out, manifest

    def generate(
        self,
        run_id: int,
        round_number: int,
        prompt: str,
        max_new_tokens: int | None,
        temperature: float,
        seed: int,
    ) -> pb.GenerateResponse:
        """Text from the base model with the run's adapter (its result unless a round is named)."""
        from fedmoe.coordinator.store.artifacts import generate, resolve_adapter
        from fedmoe.model.base import check_model_dir, load_tokenizer, resolve_model_path

        bad = self.grpc.StatusCode.INVALID_ARGUMENT
        if not 1 <= len(prompt) <= PROMPT_MAX_CHARS:
            raise AdminError(bad, f"prompt: 1-{PROMPT_MAX_CHARS} characters (got {len(prompt)})")
        if max_new_tokens is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise AdminError(
                bad, f"max_new_tokens: must be in [1, {MAX_NEW_TOKENS}] (got {max_new_tokens})"
            )
        if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
            raise AdminError(
                bad,
                f"temperature: must be in [0, {MAX_TEMPERATURE:g}] (0: greedy; got {temperature})",
            )
        found, model_path, note = resolve_adapter(self.store, run_id, round_number or None)
        checkpoint = None if found is None else self._checked_checkpoint(run_id, found)
        positions = check_model_dir(resolve_model_path(model_path)).get("max_position_embeddings")
        with self.model_lock:
            prompt_tokens = len(
                load_tokenizer(model_path)(prompt, add_special_tokens=False)["input_ids"]
            )
            if prompt_tokens == 0:
                raise AdminError(bad, "prompt: holds no token the model's tokenizer knows")
            if positions and prompt_tokens + max_new_tokens > positions:
                raise AdminError(
                    bad,
                    f"max_new_tokens: the prompt's {prompt_tokens} tokens + {max_new_tokens} new "
                    f"tokens exceed the model's {positions} positions (at most "
                    f"{max(positions - prompt_tokens, 0)} new tokens for this prompt)",
                )
            text = generate(model_path, checkpoint, prompt, max_new_tokens, temperature, seed)
        return pb.GenerateResponse(
            text=text,
            round=0 if found is None else found.number,
            note=f"the base model generated this: {note}" if found is None else "",
        )

    def _checked_checkpoint(self, run_id: int, found) -> Path:
        from fedmoe.coordinator.round.server_app import directory_sha256

        checkpoint = Path(found.checkpoint_path)
        if not checkpoint.is_dir():
            raise AdminError(
                self.grpc.StatusCode.FAILED_PRECONDITION,
                f"run {run_id} round {found.number}: its checkpoint {checkpoint} is gone",
            )
        if found.checkpoint_sha256 and directory_sha256(checkpoint) != found.checkpoint_sha256:
            raise AdminError(
                self.grpc.StatusCode.FAILED_PRECONDITION,
                f"run {run_id} round {found.number}: its checkpoint {checkpoint} changed since "
                "the round committed; it is not handed out",
            )
        return checkpoint

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
        shutil.rmtree(self.storage / EXPORTS_DIR, ignore_errors=True)  # a previous run's leftovers
        self.superlink.start()
        host, port = c.agents.address.rsplit(":", 1)
        tls = self.superlink.tls
        self.gateway = FleetGateway(
            host.strip("[]"), int(port), self.superlink.address, tls.ca, tls.cert, tls.key
        ).start()
        self.admin_server = serve(
            self, c.admin.address, tls.cert.read_bytes(), tls.key.read_bytes()
        )
        if c.dashboard.address:
            pages = Dashboard(
                self.store, lambda: self.nodes(True), c.admin.caller, c.dashboard.session_hours
            )
            self.dashboard = DashboardServer(
                pages, c.dashboard.address, str(tls.cert), str(tls.key)
            ).start()
            self.say(f"dashboard at https://{c.dashboard.address}/ (sign in with an admin token)")
        if c.metrics.address:
            registry = coordinator_registry(
                self.store, lambda: len(self.superlink.control().online_nodes())
            )
            self.metrics = serve_metrics(c.metrics.address, registry, str(tls.cert), str(tls.key))
        self.say(
            f"ready: agents connect to {c.agents.address} (TLS, registered keys only); admin API at {c.admin.address}; "
            f"runs in {c.database.url.split('@')[-1]}"
            + (f"; metrics at https://{c.metrics.address}/metrics" if self.metrics else "")
        )

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        if self.dashboard is not None:
            self.dashboard.stop()
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
            self.say(shutdown_line(str(name), running))
            return 0
        finally:
            self.stop()


def shutdown_line(reason: str, unfinished: list[int]) -> str:
    """What the coordinator says as it stops: which runs it leaves to its next start."""
    if not unfinished:
        return f"stopping ({reason}); no run is in flight"
    verb = "resumes" if len(unfinished) == 1 else "resume"
    return f"stopping ({reason}); {run_list(unfinished)} {verb} when the coordinator starts again"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _too_big(run_id: int, fmt: str, size: int, limit: int) -> str:
    return (
        f"export: run {run_id}'s {fmt} export is {size:,} bytes, over the admin API's limit of "
        f"{limit:,} (coordinator.toml admin.max_export_bytes); export format peft (the adapter "
        "alone), or run `fedmoe export --database URL` on the coordinator's host"
    )


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
    if (problem := unwritable(config.runs_dir, MIN_FREE_BYTES)) is not None:
        # Up, but every new run would be refused and every round fail before its handshake.
        return False, f"storage.dir: {problem}; runs cannot commit checkpoints"
    return True, "ok: SuperLink and agents' gateway up, storage writable"

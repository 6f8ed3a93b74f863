"""`fedmoe agent --config agent.toml`: an enterprise's node, as it runs on-prem.

A small supervisor around Flower's own SuperNode, in the spirit of Flower's app layer:
1. it loads the base model and tokenizes the enterprise's data once, into an `EnterpriseNode`
   (the node's privacy boundary: budget, ledger, training, noise);
2. it runs `flower-supernode` (with a shorter idle poll, client/supernode.py) against the
   coordinator: TLS against the coordinator's CA, authenticated with the node's private key, in
   process isolation, so that it hands every message to the agent instead of starting a process;
3. it runs those messages itself (client/executor.py) with fedmoe's installed ClientApp on the warm
   node: rounds cost training time, not process starts, and no code from the coordinator runs here;
4. it keeps the node connected without an operator: it restarts the SuperNode whenever it exits or
   gives up (coordinator unreachable, restarted or down for minutes, a network cut, a refused
   activation while the node's previous session expires) with a bounded backoff, says in its log
   when the connection is lost and back, notices when it was itself suspended (SIGSTOP, a VM pause,
   a swap storm), and says what to do when the coordinator refuses the key. A message lost to a
   pause costs that message only (client/executor.py); only SIGINT or SIGTERM from outside stop
   the agent;
5. it writes `<state_dir>/health.json` every few seconds for `fedmoe agent health`.
Nothing of the agent listens on the network but its Prometheus /metrics, and only where the
enterprise's operator sets `metrics_address` (client/metrics.py); the enterprise's records never
leave this process except as the releases `EnterpriseNode` decides on.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from fedmoe.client.agent_config import AgentConfig
from fedmoe.client.client_app import build_client_app
from fedmoe.client.enterprise import EnterpriseNode
from fedmoe.client.executor import run_tasks
from fedmoe.client.metrics import AgentCollector, serve_agent_metrics
from fedmoe.client.supernode import (
    HEARTBEAT_BACK,
    HEARTBEAT_DEAD,
    HEARTBEAT_MISSED,
    NODE_EXPIRY_S,
    POLL_ENV,
)
from fedmoe.support.processes import (
    Stopped,
    flower_env,
    free_port,
    start_process,
    stop_on_signals,
    stop_process_group,
)

HEALTH_FILE = "health.json"
HEALTH_EVERY_S = 5.0
RECONNECT_AFTER_S = 10
MAX_BACKOFF_S = 5.0
REFUSED_HINTS = ("Failed to activate SuperNode", "Invalid SuperNode authentication")
GAVE_UP = "Giving up reconnection"  # Flower's SuperNode, after --max-wait-time
CONNECTED = "SuperNode ID: "  # Flower's SuperNode, once the coordinator activated it
PAUSED_AFTER_S = 10.0  # a supervision loop this late was suspended, not slow
RETRY_QUIET_S = 60.0  # while the coordinator stays unreachable, one attempt's lines a minute


def _new_lines(log_path: Path, offset: int) -> tuple[list[str], int]:
    """The complete lines of the SuperNode's log from `offset` on, and where to read next time (a
    line still being written is read next time, whole)."""
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            text = log.read()
    except OSError:
        return [], offset
    end = text.rfind(b"\n") + 1
    return text[:end].decode(errors="replace").splitlines(), offset + end


class Agent:
    def __init__(self, config: AgentConfig, say=print):
        self.config = config
        self.say = lambda text: say(
            f"[agent {config.name} {time.strftime('%H:%M:%S')}] {text}", flush=True
        )
        self.state = Path(config.state_dir)
        self.runtime_address: str | None = None
        self.supernode = None  # the running SuperNode's process
        self.connections = 0  # how often the coordinator activated this node
        self.tasks = {"count": 0, "last": None}

    def _secret_file(self) -> Path:
        """The SuperExec secret: only holders may take tasks from the SuperNode's local API."""
        path = self.state / "superexec.secret"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        return path

    def supernode_command(self, runtime_port: int, secret_file: Path) -> list[str]:
        c = self.config
        return [
            sys.executable, "-m", "fedmoe.client.supernode",
            "--superlink", c.coordinator,
            "--root-certificates", c.ca_certificate,
            "--auth-supernode-private-key", c.private_key,
            "--isolation", "process",
            # Give up on an unreachable coordinator after a short while: the agent then starts a
            # fresh SuperNode on its own, shorter backoff (Flower's grows past tens of seconds).
            "--max-wait-time", str(RECONNECT_AFTER_S),
            "--superexec-auth-secret-file", str(secret_file),
            "--host", "127.0.0.1", "--port", str(runtime_port),
        ]  # fmt: skip

    def _on_task(self, kind: str, seconds: float, error: str | None) -> None:
        self.tasks["count"] += 1
        self.tasks["last"] = {
            "kind": kind,
            "seconds": round(seconds, 3),
            "at": time.time(),
            "error": error,
        }
        self.say(
            f"{kind} task failed: {error}" if error else f"{kind} message served in {seconds:.2f}s"
        )

    def _relay(self, line: str) -> str | None:
        """Say what a line of the SuperNode's log means for the node; returns "connected", "lost"
        or "gave up" for the supervisor."""
        if CONNECTED in line:
            node = line.split(CONNECTED, 1)[1].strip()
            self.say(
                f"{'reconnected' if self.connections else 'connected'} to the coordinator "
                f"(Flower node {node})"
            )
            self.connections += 1
            return "connected"
        if HEARTBEAT_BACK in line:
            self.say(
                "reconnected: heartbeat taken again " + line.split(HEARTBEAT_BACK, 1)[1].strip()
            )
        elif HEARTBEAT_MISSED in line:
            self.say(
                "lost the coordinator: it did not take this node's heartbeat; the SuperNode retries "
                f"for {RECONNECT_AFTER_S}s, then the agent starts a new one"
            )
            return "lost"
        elif HEARTBEAT_DEAD in line:
            self.say(
                "the SuperNode's heartbeat failed for good: "
                + line.split(HEARTBEAT_DEAD, 1)[1].strip()
            )
        elif GAVE_UP in line:
            return "gave up"
        return None

    def _write_health(self, supernode_alive: bool) -> None:
        health = {
            "at": time.time(),
            "supernode": supernode_alive,
            "tasks": self.tasks["count"],
            "last_task": self.tasks["last"],
        }
        tmp = self.state / f".{HEALTH_FILE}.tmp"
        tmp.write_text(json.dumps(health))
        tmp.replace(self.state / HEALTH_FILE)

    def _say_paused(self, seconds: float) -> None:
        self.say(
            f"this agent was suspended for {seconds:.0f}s (SIGSTOP, a VM pause, a swap storm or a "
            "debugger), not stopped: it carries on"
            + (
                "; if its SuperNode was suspended too, the coordinator counted the node gone "
                f"(after {NODE_EXPIRY_S:.0f}s without a heartbeat) and rounds went on without it "
                "until its next heartbeat"
                if seconds > NODE_EXPIRY_S
                else ""
            )
        )

    def run(self) -> int:
        c = self.config
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        node = EnterpriseNode(c.node_settings())
        ws = node.warm_up()
        budgets = (
            ", ".join(f"{k} eps {v:g}" for k, v in node.budgets.items() if v is not None) or "none"
        )
        self.say(
            f"data ready: {ws.train_records.shape[0]} training records "
            f"({ws.train_blocks.shape[0]} blocks), {ws.heldout_records.shape[0]} held out; "
            f"model {ws.base_fingerprint[:12]} loaded on {ws.device}; "
            f"ledger {c.ledger} (lifetime budgets: {budgets})"
        )
        if c.metrics_address:
            collector = AgentCollector(node.ledger, node.budgets, node.refusals)
            serve_agent_metrics(c.metrics_address, collector)
            self.say(
                f"metrics at http://{c.metrics_address}/metrics (plain HTTP, for this enterprise)"
            )
        pinned = node.federation.pinned
        self.say(
            f"secure aggregation: {len(pinned)} pinned members ({c.federation_keys}); a noise share "
            "only in sessions of at least the threshold of them"
            if pinned is not None
            else "secure aggregation: no federation pinned (federation_keys): full noise under SecAgg+"
        )
        secret_file = self._secret_file()
        stop = threading.Event()
        executor = threading.Thread(
            target=run_tasks,
            args=(
                lambda: self.runtime_address,
                secret_file.read_bytes(),
                build_client_app(lambda ctx: node),
                stop,
                c.poll_interval_s,
                self._on_task,
            ),
            name="executor",
            daemon=True,
        )
        executor.start()
        env = flower_env(self.state / "flower", **{POLL_ENV: str(c.poll_interval_s)})
        log_path = self.state / "supernode.log"
        try:
            with stop_on_signals():
                self._supervise(secret_file, env, log_path)
        except Stopped as name:
            self.say(f"stopping ({name})")
            return 0
        finally:
            stop.set()
            if self.supernode is not None:
                stop_process_group(self.supernode)

    def _supervise(self, secret_file: Path, env: dict, log_path: Path) -> None:
        """Run the SuperNode for good: a new one whenever it exits or gives up, `MAX_BACKOFF_S`
        apart at most. While the coordinator stays unreachable, the attempts after the first are
        said once a minute, with their number and since when."""
        c = self.config
        port, backoff = free_port(), 1.0
        attempt, loud_at, down_since, alive_at = 0, 0.0, None, None
        while True:
            started = time.monotonic()
            attempt += 1  # SuperNodes started since the node was last connected
            loud = attempt == 1 or started - loud_at >= RETRY_QUIET_S
            if loud:
                loud_at = started
                self.say(
                    f"connecting to the coordinator at {c.coordinator} (SuperNode log: {log_path})"
                    if attempt == 1
                    else f"still reconnecting to the coordinator at {c.coordinator}: attempt "
                    f"{attempt}, unreachable since {down_since}; one line a minute until it answers"
                )
            offset = session = log_path.stat().st_size if log_path.exists() else 0
            self.supernode = proc = start_process(
                self.supernode_command(port, secret_file), env, log_path
            )
            self.runtime_address = f"127.0.0.1:{port}"
            connected = gave_up = False
            last_health = 0.0
            tick = time.monotonic()
            while proc.poll() is None:
                now = time.monotonic()
                if now - tick > PAUSED_AFTER_S:
                    self._say_paused(now - tick)
                tick = now
                lines, offset = _new_lines(log_path, offset)
                for event in [self._relay(line) for line in lines]:
                    if event == "connected":
                        connected, down_since = True, None
                    elif event == "lost":
                        down_since = down_since or time.strftime("%H:%M:%S")
                    elif event == "gave up" and not gave_up:
                        # Flower's SuperNode can stay up after giving up: start afresh.
                        gave_up = True
                        stop_process_group(proc)
                if connected:
                    alive_at = now
                if now - last_health >= HEALTH_EVERY_S:
                    self._write_health(True)
                    last_health = now
                time.sleep(0.5)
            self.runtime_address = None
            self._write_health(False)
            lines, offset = _new_lines(log_path, offset)
            gave_up = "gave up" in [self._relay(line) for line in lines] or gave_up
            with open(log_path, "rb") as log:
                log.seek(max(session, log_path.stat().st_size - 3000))
                refused = any(h in log.read().decode(errors="replace") for h in REFUSED_HINTS)
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, MAX_BACKOFF_S)
            down_since = down_since or time.strftime("%H:%M:%S")
            if connected:  # a new outage: its first attempt is said in full
                attempt, loud = 0, True
            if loud:
                why = _why_down(proc.returncode, gave_up, refused, alive_at)
                self.say(f"{why}; reconnecting in {backoff:.0f}s")
            time.sleep(backoff)


def _why_down(code: int | None, gave_up: bool, refused: bool, alive_at: float | None) -> str:
    """Why the SuperNode is gone, for the operator; `alive_at`: when the node was last connected."""
    if gave_up:
        return f"the SuperNode gave up reaching the coordinator after {RECONNECT_AFTER_S}s"
    if refused and alive_at is not None and time.monotonic() - alive_at < NODE_EXPIRY_S + 15:
        return (
            "the coordinator refused to activate this node, most likely while its previous "
            f"session is still open (it closes {NODE_EXPIRY_S:.0f}s after the last heartbeat); "
            "if this lasts beyond a minute, its key is not registered or was revoked"
        )
    if refused:
        return (
            "the coordinator refused to activate this node: its key is not registered or was "
            "revoked (ask the platform admin: `fedmoe admin nodes register NAME --public-key "
            "node.pub`; a revoked key never comes back), or this node's previous session has "
            f"not expired yet ({NODE_EXPIRY_S:.0f}s)"
        )
    return f"the SuperNode exited (code {code})"


def agent_health(
    config: AgentConfig, max_age_s: float = 3 * HEALTH_EVERY_S + 5
) -> tuple[bool, str]:
    """Is the agent up: a fresh health file and a live SuperNode?"""
    path = Path(config.state_dir) / HEALTH_FILE
    try:
        health = json.loads(path.read_text())
    except (OSError, ValueError):
        return False, f"no health file at {path}: is `fedmoe agent` running?"
    age = time.time() - float(health.get("at", 0))
    if age > max_age_s:
        return False, f"the agent's health file is {age:.0f}s old: the agent is not running"
    if not health.get("supernode"):
        return False, "the SuperNode is not running (reconnecting to the coordinator)"
    return True, f"ok: SuperNode up, {health.get('tasks', 0)} messages served"

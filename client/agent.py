"""`fedmoe agent --config agent.toml`: an enterprise's node, as it runs on-prem.

A small supervisor around Flower's own SuperNode, in the spirit of Flower's app layer:
1. it loads the base model and tokenizes the enterprise's data once, into an `EnterpriseNode`
   (the node's privacy boundary: budget, ledger, training, noise);
2. it runs `flower-supernode` (with a shorter idle poll, client/supernode.py) against the
   coordinator: TLS against the coordinator's CA, authenticated with the node's private key, in
   process isolation, so that it hands every message to the agent instead of starting a process;
3. it runs those messages itself (client/executor.py) with fedmoe's installed ClientApp on the warm
   node: rounds cost training time, not process starts, and no code from the coordinator runs here;
4. it restarts the SuperNode if it exits (coordinator unreachable or restarted) with backoff, and
   says what to do when the coordinator refuses the key;
5. it writes `<state_dir>/health.json` every few seconds for `fedmoe agent health`.
Nothing of the agent listens on the network; the enterprise's records never leave this process
except as the releases `EnterpriseNode` decides on.
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
from fedmoe.client.supernode import POLL_ENV
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


def _gave_up(log_path: Path, offset: int) -> tuple[bool, int]:
    """Whether the SuperNode's log from `offset` on says it stopped trying to reconnect, and
    where to read next time (a line cut by the read is read again)."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        text = log.read()
    return GAVE_UP.encode() in text, offset + max(0, len(text) - len(GAVE_UP))


class Agent:
    def __init__(self, config: AgentConfig, say=print):
        self.config = config
        self.say = lambda text: say(
            f"[agent {config.name} {time.strftime('%H:%M:%S')}] {text}", flush=True
        )
        self.state = Path(config.state_dir)
        self.runtime_address: str | None = None
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
        proc, backoff, port = None, 1.0, free_port()
        try:
            with stop_on_signals():
                while True:
                    started = time.monotonic()
                    offset = log_path.stat().st_size if log_path.exists() else 0
                    proc = start_process(self.supernode_command(port, secret_file), env, log_path)
                    self.runtime_address = f"127.0.0.1:{port}"
                    self.say(
                        f"connecting to the coordinator at {c.coordinator} (SuperNode log: {log_path})"
                    )
                    last_health, read_to = 0.0, offset
                    while proc.poll() is None:
                        if time.monotonic() - last_health >= HEALTH_EVERY_S:
                            self._write_health(True)
                            last_health = time.monotonic()
                            gave_up, read_to = _gave_up(log_path, read_to)
                            if gave_up:
                                # Flower's SuperNode can stay up after giving up: start afresh.
                                stop_process_group(proc)
                        time.sleep(0.5)
                    self.runtime_address = None
                    self._write_health(False)
                    tail = log_path.read_text(errors="replace")[offset:][-3000:]
                    if any(h in tail for h in REFUSED_HINTS):
                        self.say(
                            "the coordinator refused to activate this node: its key is not registered or was revoked "
                            "(ask the platform admin: `fedmoe admin nodes register NAME --public-key node.pub`; a revoked "
                            "key never comes back), or this node's previous session has not expired yet (20 s)"
                        )
                    backoff = (
                        1.0 if time.monotonic() - started > 60 else min(backoff * 2, MAX_BACKOFF_S)
                    )
                    self.say(
                        f"the SuperNode exited (code {proc.returncode}); reconnecting in {backoff:.0f}s"
                    )
                    time.sleep(backoff)
        except Stopped as name:
            self.say(f"stopping ({name})")
            return 0
        finally:
            stop.set()
            if proc is not None:
                stop_process_group(proc)


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

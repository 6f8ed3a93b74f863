"""An agent outlives a pause: SIGSTOP its whole process tree (the agent, its SuperNode, the
watchdogs: what a VM pause, a swap storm or a debugger does) while it trains, for longer than the
coordinator's node expiry and the SuperNode's task expiry, then SIGCONT it. It must carry on,
say so, rejoin, and be in the run's next round; SIGTERM must still stop it cleanly.

Before the fix, Flower's HTTP retry policy answered the expired task's 401 with SIGINT to the
agent's own process, and the agent exited ("stopping (SIGINT)")."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from loopback import Loopback

from fedmoe.client.agent import CONNECTED, _new_lines
from fedmoe.client.executor import TASK_EXPIRY_S, TaskLost, _client
from fedmoe.client.supernode import NODE_EXPIRY_S
from fedmoe.coordinator.store.db import RunStore
from fedmoe.model.corpus import DEMO_DATA_DIR
from fedmoe.support.watchdog import descendants

# Longer than the coordinator's node expiry (20 s) and the SuperNode's expiry of a running task
# (60 s after its last heartbeat: Flower's default, which the SuperNode keeps).
PAUSE_S = max(NODE_EXPIRY_S, TASK_EXPIRY_S) + 5
SMALL_ADAPTER = ("lora.r=4", "lora.alpha=8.0")


def _wait(predicate, timeout: float, what: str, on_fail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout:.0f}s\n{on_fail()}")
        time.sleep(0.2)


def _signal_tree(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.mark.e2e
def test_a_paused_agent_rejoins_by_itself_and_sigterm_still_stops_it(tmp_path):
    names = ["finance", "clinical"]
    loop = Loopback(tmp_path)
    try:
        loop.start_coordinator()
        for name in names:
            loop.add_agent(name, DEMO_DATA_DIR / name)
            loop.register(name)
            loop.start_agent(name)
        loop.wait_online(names)
        agent = loop.agents["clinical"]
        supernode_log = tmp_path / "agents" / "clinical" / "state" / "supernode.log"

        # A round whose training is still running when the pause begins; the run's next round
        # waits for both enterprises (min_fit_clients), so it must have the paused one back.
        run = loop.start_run(
            overrides=(
                "federation.rounds=2",
                "federation.min_fit_clients=2",
                "federation.max_failed_rounds=1",
                "train.local_steps=60",
                *SMALL_ADAPTER,
            )
        )

        def received_train() -> bool:
            text = supernode_log.read_text(errors="replace")
            return "Received successfully" in text[text.find("Receiving: train message") :]

        _wait(
            received_train, 180, "no train message reached clinical", lambda: loop.log("clinical")
        )
        time.sleep(1.0)  # the executor acquires it within its 0.2 s poll, and trains
        assert "train message served" not in loop.log("clinical"), "training ended before the pause"
        tree = [agent.pid, *sorted(descendants(agent.pid))]
        assert len(tree) >= 2  # the agent and at least its SuperNode
        _signal_tree(tree, signal.SIGSTOP)
        try:
            time.sleep(PAUSE_S)
        finally:
            _signal_tree(tree, signal.SIGCONT)

        _wait(
            lambda: "reconnected" in loop.log("clinical"),
            60,
            "the agent did not say it reconnected",
            lambda: loop.log("clinical")[-3000:],
        )
        log = loop.log("clinical")
        assert agent.poll() is None, log[-3000:]
        assert "this agent was suspended for" in log, log[-3000:]
        loop.wait_online(names, timeout=60)

        # The same run's next round has it (once it has finished training for the lost message).
        final = loop.wait_for(run.id, ("completed", "failed"), timeout=400)
        assert final.status == "completed", final.error
        lost, rejoined = RunStore(loop.database_url, migrate=False).rounds(run.id)
        assert {p.enterprise: p.status for p in lost.participations}["clinical"] == "failed"
        assert rejoined.status == "completed"
        assert {p.enterprise: p.status for p in rejoined.participations} == {
            "finance": "ok",
            "clinical": "ok",
        }
        log = loop.log("clinical")
        assert "the SuperNode no longer knows this task" in log, log[-3000:]  # the pause hit it
        assert "stopping" not in log and agent.poll() is None, log[-3000:]

        # The operator's SIGTERM still stops it, its SuperNode with it.
        supernodes = [
            pid for pid in descendants(agent.pid) if b"fedmoe.client.supernode" in _cmdline(pid)
        ]
        assert supernodes
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, loop.log("clinical")[-3000:]
        assert "stopping (SIGTERM)" in loop.log("clinical")
        for pid in supernodes:
            _wait(lambda pid=pid: not _cmdline(pid), 30, f"SuperNode {pid} outlived its agent")
    finally:
        loop.close()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_a_forgotten_task_is_lost_without_signalling_the_agent(tmp_path):
    """A 401 from the SuperNode's Runtime API (the task's token expired) raises TaskLost; Flower's
    own retry policy would have sent SIGINT to this process."""
    import http.server

    class Forgotten(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forgotten)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *a: interrupted.append(a))
    try:
        from flwr.proto.runtime_pb2 import PullTaskInputRequest

        client = _client(f"127.0.0.1:{server.server_port}", [], retry=True)
        with pytest.raises(TaskLost, match="no longer knows this task"):
            client.PullTaskInput(PullTaskInputRequest())
        time.sleep(0.2)
        assert not interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        server.shutdown()


def test_the_agent_reads_only_whole_lines_of_the_supernode_log(tmp_path):
    log = tmp_path / "supernode.log"
    log.write_text("INFO an earlier line\n")
    lines, offset = _new_lines(log, 0)
    assert lines == ["INFO an earlier line"] and offset == log.stat().st_size
    with log.open("a") as f:
        f.write(f"INFO {CONNECTED}12")  # still being written
    assert _new_lines(log, offset) == ([], offset)
    with log.open("a") as f:
        f.write("34\n")
    assert _new_lines(log, offset)[0] == [f"INFO {CONNECTED}1234"]
    assert _new_lines(tmp_path / "missing.log", 7) == ([], 7)

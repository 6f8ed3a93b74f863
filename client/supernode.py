"""Flower's SuperNode with shorter waits: `python -m fedmoe.client.supernode [flower-supernode args]`.

Flower's own `flower-supernode`, unchanged except for the latency constants in
support/flower_tuning.py (idle poll at most FEDMOE_SUPERNODE_POLL_S seconds, the agent's
`poll_interval_s`; a 10 s heartbeat; short object-pull retries), timestamps in its log, which the
agent writes to a file, and its node heartbeat, which says in that log when the coordinator stops
and starts taking it again (the agent relays both: a network cut, a coordinator that was down, a
pause of the whole machine longer than the coordinator's heartbeat expiry). A heartbeat that fails
for good (the coordinator no longer knows this node) ends the SuperNode, which the agent restarts;
Flower would leave it running without a heartbeat, a node the coordinator never sees again.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from logging import ERROR, INFO, WARNING

from flwr.common.constant import HEARTBEAT_PATIENCE

from fedmoe.support.flower_tuning import (
    NODE_HEARTBEAT_INTERVAL_S,
    shorten_node_heartbeat,
    shorten_object_pull_backoff,
    shorten_supernode_polls,
)

POLL_ENV = "FEDMOE_SUPERNODE_POLL_S"
# The coordinator counts a node gone after this long without a heartbeat (Flower's patience).
NODE_EXPIRY_S = HEARTBEAT_PATIENCE * NODE_HEARTBEAT_INTERVAL_S
# Markers in the SuperNode's log, read by the agent (client/agent.py).
HEARTBEAT_MISSED = "fedmoe: heartbeat not taken"
HEARTBEAT_BACK = "fedmoe: heartbeat taken again"
HEARTBEAT_DEAD = "fedmoe: heartbeat failed for good"


def log_heartbeats(interval_s: float = NODE_HEARTBEAT_INTERVAL_S) -> None:
    """Wrap the SuperNode's node heartbeat: log the first missed beat of an outage, the first one
    taken after it (or after a gap longer than the coordinator's expiry: a pause of this
    process), and end the process on an error Flower's sender would die of silently."""
    import httpx
    from flwr.supercore import log
    from flwr.supernode import fleet_http_connection

    base = getattr(fleet_http_connection, "HeartbeatSender", None)
    if base is None:
        raise RuntimeError(
            "flwr.supernode.fleet_http_connection no longer uses HeartbeatSender; review fedmoe.client.supernode"
        )
    expiry_s = HEARTBEAT_PATIENCE * interval_s  # NODE_EXPIRY_S at the default interval

    class LoggedHeartbeatSender(base):
        def __init__(self, heartbeat_fn):
            lock = threading.Lock()
            state = {"taken": None, "missed": False}

            def beat() -> bool:
                try:
                    ok = heartbeat_fn()
                except Exception as err:  # Flower's sender thread would end here, silently
                    log(
                        ERROR, "%s (%s: %s); stopping the SuperNode", HEARTBEAT_DEAD,
                        type(err).__name__, err,
                    )  # fmt: skip
                    signalled = (
                        isinstance(err, httpx.HTTPStatusError) and err.response.status_code == 401
                    )
                    if not signalled:  # Flower signals a 401 itself
                        os.kill(os.getpid(), signal.SIGINT)  # Flower's own graceful exit
                    raise
                with lock:
                    now = time.monotonic()
                    gap = now - (state["taken"] or now)
                    if ok:
                        if state["missed"] or gap > expiry_s:
                            log(
                                INFO, "%s after %.0f s without one: this node is online (a node is "
                                "counted gone after %.0f s without one)", HEARTBEAT_BACK, gap, expiry_s,
                            )  # fmt: skip
                        state.update(taken=now, missed=False)
                    elif not state["missed"]:
                        state["missed"] = True
                        log(
                            WARNING,
                            "%s (the coordinator is unreachable); retrying",
                            HEARTBEAT_MISSED,
                        )
                return ok

            super().__init__(beat)

    fleet_http_connection.HeartbeatSender = LoggedHeartbeatSender


def main() -> None:
    shorten_supernode_polls(float(os.environ.get(POLL_ENV, "3")))
    shorten_object_pull_backoff()
    shorten_node_heartbeat()
    log_heartbeats()
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    update_console_handler(timestamps=True, colored=False)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()

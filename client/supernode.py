"""Flower's SuperNode with shorter waits: `python -m fedmoe.client.supernode [flower-supernode args]`.

Flower's own `flower-supernode`, unchanged except for the latency constants in
support/flower_tuning.py (idle poll at most FEDMOE_SUPERNODE_POLL_S seconds, the agent's
`poll_interval_s`; a 10 s heartbeat; short object-pull retries) and timestamps in its log, which the
agent writes to a file.
"""

from __future__ import annotations

import os
import sys

from fedmoe.support.flower_tuning import (
    shorten_node_heartbeat,
    shorten_object_pull_backoff,
    shorten_supernode_polls,
)

POLL_ENV = "FEDMOE_SUPERNODE_POLL_S"


def main() -> None:
    shorten_supernode_polls(float(os.environ.get(POLL_ENV, "3")))
    shorten_object_pull_backoff()
    shorten_node_heartbeat()
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    update_console_handler(timestamps=True, colored=False)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()

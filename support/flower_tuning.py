"""Flower's latency constants that cost every round, and the one place we shorten them.

Flower 1.42 (like 1.41) hard-codes waits that are harmless for long rounds but, several times per
message, are most of a short one. Each shortening below is a constant, not a code path: Flower
still does all the work. tests/test_house.py
(test_flower_still_has_every_latency_constant_we_shorten) checks that the pinned Flower still has
each of them, so an upgrade that moves one fails a test instead of silently slowing rounds down.

- An idle SuperNode asks for work every 3 s and checks for its ClientApp's reply every 0.5 s
  (`time.sleep` in flwr.supernode.start_client_internal): at most `poll_s` here.
- A SuperNode says it is alive every ~20 s and is declared gone after 60 s without a heartbeat;
  a SuperNode that restarts is refused until its old session expires. With a 10 s interval (the
  least the SuperLink accepts), a dead agent is noticed, and a restarted one let back in, after
  20 s.
- Whoever pulls a message's objects (a SuperNode pulling the coordinator's message, the ServerApp
  pulling a reply) may arrive before the sender has uploaded them, since Flower publishes a message
  before its objects; it then waits 1 s before asking again (PULL_INITIAL_BACKOFF): 0.05 s here.
  The agent's executor pulls from its own SuperNode, where a message's objects are local: if they
  are not there within a minute, the message is gone (its run was stopped), and the executor gives
  up instead of waiting Flower's two hours with the node's next messages queued behind it.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

OBJECT_PULL_BACKOFF_S = 0.05
NODE_HEARTBEAT_INTERVAL_S = 10.0


def shorten_supernode_polls(poll_s: float) -> None:
    from flwr.supernode import start_client_internal

    if start_client_internal.time is not time:
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer uses the time module; review fedmoe.support.flower_tuning"
        )
    shortened = SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    )
    shortened.sleep = lambda seconds: time.sleep(min(seconds, poll_s))
    start_client_internal.time = shortened


def shorten_object_pull_backoff(
    seconds: float = OBJECT_PULL_BACKOFF_S, max_time: float | None = None
) -> None:
    """Retry a missing object after `seconds`; with `max_time`, give up on a message whose
    objects never come (Flower waits up to two hours)."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in (
        inflatable_utils.pull_objects,
        inflatable_utils.pull_and_inflate_object_from_tree,
    ):
        defaults = function.__kwdefaults__
        if not defaults or "initial_backoff" not in defaults or "max_time" not in defaults:
            raise RuntimeError(
                f"{function.__qualname__} lost its pull defaults; review fedmoe.support.flower_tuning"
            )
        defaults["initial_backoff"] = seconds
        if max_time is not None:
            defaults["max_time"] = max_time


def shorten_node_heartbeat(interval_s: float = NODE_HEARTBEAT_INTERVAL_S) -> None:
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    if interval_s < HEARTBEAT_MIN_INTERVAL:
        raise ValueError(
            f"the SuperLink refuses heartbeat intervals below {HEARTBEAT_MIN_INTERVAL}s"
        )
    for module in (heartbeat, fleet_http_connection):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise RuntimeError(
                f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL; review fedmoe.support.flower_tuning"
            )
        module.HEARTBEAT_DEFAULT_INTERVAL = interval_s

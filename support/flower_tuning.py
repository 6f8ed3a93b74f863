"""Flower's latency constants that cost every round, and the one place we shorten them.

Flower 1.41 hard-codes waits that are harmless for long rounds but, several times per message,
are most of a short one. Each shortening below is a constant, not a code path: Flower still does
all the work. tests/test_flower_tuning.py checks that the pinned Flower still has each of them, so
an upgrade that moves one fails a test instead of silently slowing rounds down.

- An idle SuperNode asks for work every 3 s and checks for its ClientApp's reply every 0.5 s
  (`time.sleep` in flwr.supernode.start_client_internal): at most `poll_s` here.
- Whoever pulls a message's objects (a SuperNode pulling the coordinator's message, the ServerApp
  pulling a reply) may arrive before the sender has uploaded them, since Flower publishes a message
  before its objects; it then waits 1 s before asking again (PULL_INITIAL_BACKOFF): 0.05 s here.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

OBJECT_PULL_BACKOFF_S = 0.05


def shorten_supernode_polls(poll_s: float) -> None:
    from flwr.supernode import start_client_internal

    if start_client_internal.time is not time:
        raise RuntimeError("flwr.supernode.start_client_internal no longer uses the time module; review fedmoe.support.flower_tuning")
    shortened = SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    shortened.sleep = lambda seconds: time.sleep(min(seconds, poll_s))
    start_client_internal.time = shortened


def shorten_object_pull_backoff(seconds: float = OBJECT_PULL_BACKOFF_S) -> None:
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__
        if not defaults or "initial_backoff" not in defaults:
            raise RuntimeError(f"{function.__qualname__} has no initial_backoff default; review fedmoe.support.flower_tuning")
        defaults["initial_backoff"] = seconds

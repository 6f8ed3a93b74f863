"""The coordinator's view of Flower's Grid: only the run's registered enterprises, replies as they come.

What Flower's own Grid does not do for us:
- it lists every node connected to the SuperLink; a run must only ever talk to the enterprises it
  was started for, as the node registry names them (`allowed`);
- its `send_and_receive` re-pulls replies every 3 seconds, a fixed cost in every message round
  trip of every round; this one pulls every `poll_interval` seconds (and a reply whose objects
  are still uploading is asked again after 0.05 s, not 1 s: support/flower_tuning.py);
- Flower's legacy workflow waits for training replies with no time limit; here a call without a
  timeout waits at most `default_timeout`;
- the legacy workflow hands the strategy a node's error reply without saying whose it was; here
  `last_errors` keeps, per node, why its reply to the last call failed (or that none came);
- a node's SecAgg+ masked vector arrives packed (contract/secagg_transport.py): unpacked here,
  before Flower's workflow reads it;
- nothing counts what crosses the wire; `traffic()` is the bytes of every message this run sent
  and received so far, whichever workflow sent it (the legacy one, the budget handshake, or
  SecAgg+'s keys, shares and masked vectors, which the strategy never sees).
Everything else is Flower's Grid, delegated unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedmoe.contract import secagg_transport
from fedmoe.support.flower_tuning import shorten_object_pull_backoff


class FleetGrid(Grid):
    def __init__(
        self,
        grid: Grid,
        allowed: Callable[[], set[int]] | None = None,
        poll_interval: float = 0.1,
        default_timeout: float | None = None,
    ):
        self._grid = grid
        self._allowed = allowed
        self._poll_interval = poll_interval
        self._default_timeout = default_timeout
        self.last_errors: dict[int, str] = {}
        self.bytes_down = 0  # sent to nodes
        self.bytes_up = 0  # received from nodes
        shorten_object_pull_backoff()  # replies are pulled as soon as their objects are up

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl=None
    ):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self._grid.get_node_ids())
        if self._allowed is None:
            return nodes
        allowed = self._allowed()
        return [n for n in nodes if n in allowed]

    def traffic(self) -> tuple[int, int]:
        """Bytes (sent to nodes, received from them) by this run so far."""
        return self.bytes_down, self.bytes_up

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.bytes_down += sum(message_bytes(m) for m in messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self.bytes_up += sum(message_bytes(m) for m in replies)
        for reply in replies:
            if reply.has_content():  # a SecAgg+ masked vector, back where Flower reads it
                secagg_transport.unpack(reply.content)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        started = time.monotonic()
        kind = messages[0].metadata.message_type if messages else "-"
        ids = list(self.push_messages(messages))
        destination = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}
        pending = set(ids)
        timeout = self._default_timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            received = list(self.pull_messages(pending))
            replies += received
            pending -= {m.metadata.reply_to_message_id for m in received}
            if pending:
                time.sleep(self._poll_interval)
        self.last_errors = {
            destination[m.metadata.reply_to_message_id]: m.error.reason
            for m in replies
            if m.has_error() and m.metadata.reply_to_message_id in destination
        }
        for mid in pending:
            self.last_errors[destination[mid]] = f"no reply within {timeout:g}s"
        # Not a progress line ("[fedmoe]" lines are shown to users): read by benchmarks/deployment.py.
        print(
            f"[fedmoe-timing] {kind} x{len(messages)} {time.monotonic() - started:.3f}s", flush=True
        )
        return replies


def message_bytes(message: Message) -> int:
    """A message's size on the wire: Flower 1.42 sends a message as the tree of its objects
    (metadata, records, arrays cut into chunks of up to 5 MB), each distinct object once, in its
    serialized (`deflate`) form. Counted per message, i.e. per node: the SuperLink keeps one copy
    of content sent to several nodes, but each node downloads its own."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())

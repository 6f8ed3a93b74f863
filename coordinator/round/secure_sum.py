"""Flower's SecAgg+ workflow, with what the nodes need to trust it (contract/secagg_session.py):
each node's signed keys relayed to its peers, and a consistency round before unmasking.

- Setup: each node's identity and key signature, taken from its reply, go to its peers beside
  its keys in the share-keys request; a node shares nothing with a peer it cannot verify.
- Consistency (Bonawitz et al. 2017, round 4): after the masked vectors, the survivors are named
  to every survivor, each signs that set, and the unmask request carries the signatures; a node
  reveals shares only for a set that at least the threshold of its session's members signed.
- A client lost after sending its public keys and before sharing its key shares masked nothing
  with anyone (nodes mask only with the peers whose shares they received), and no one holds a
  share of its key; Flower 1.42 still counts it "dead" and asks the others for its shares, which
  fails their unmask stage. Such a node is simply not in the round.

Flower's stages run unchanged: its messages only gain keys beside its own, through a grid that
adds them on the way out and reads them on the way back.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import ERROR, INFO

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedmoe.contract import secagg_session as wire


class _Relay:
    """A grid that passes every outgoing message through `out` and every reply through `back`."""

    def __init__(self, grid, out: Callable[[Message], None], back: Callable[[Message], None]):
        self.grid, self.out, self.back = grid, out, back

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        for message in messages:
            self.out(message)
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if not reply.has_error():
                self.back(reply)
        return replies


def _configs(message: Message) -> ConfigRecord:
    return message.content.config_records[RECORD_KEY_CONFIGS]


class SecureSumWorkflow(SecAggPlusWorkflow):
    def setup_stage(self, grid, context, state) -> bool:
        state.fedmoe_claims = {}

        def keep_claim(reply: Message) -> None:
            configs = _configs(reply)
            identity, signature = configs.get(wire.IDENTITY), configs.get(wire.KEY_SIGNATURE)
            if isinstance(identity, bytes) and isinstance(signature, bytes):
                state.fedmoe_claims[reply.metadata.src_node_id] = [identity, signature]

        return super().setup_stage(_Relay(grid, lambda m: None, keep_claim), context, state)

    def share_keys_stage(self, grid, context, state) -> bool:
        def add_claims(message: Message) -> None:
            configs = _configs(message)
            for key in [k for k in configs if k.isdigit()]:
                if (claim := state.fedmoe_claims.get(int(key))) is not None:
                    configs[wire.PEER + key] = claim

        proceed = super().share_keys_stage(_Relay(grid, add_claims, lambda m: None), context, state)
        # Those who shared their key shares: the round's members from here on.
        state.sampled_node_ids = set(state.active_node_ids)
        return proceed

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        before = len(state.failures)
        proceed = super().collect_masked_vectors_stage(grid, context, state)
        for failure in state.failures[before:]:  # a node's refusal says why, e.g. a replay
            print(f"[fedmoe] SecAgg+ masked vector refused by a node: {failure}"[:600], flush=True)
        return proceed

    def unmask_stage(self, grid, context, state) -> bool:
        signatures = self._consistency_round(grid, context, state)
        if len(signatures) < state.threshold:
            log(
                ERROR,
                "SecAgg+ consistency round: %s of %s survivors signed, %s needed",
                len(signatures),
                len(state.active_node_ids),
                state.threshold,
            )
            return False
        signers = sorted(signatures)

        def add_signatures(message: Message) -> None:
            configs = _configs(message)
            configs[wire.SIGNERS] = signers
            configs[wire.SIGNATURES] = [signatures[i] for i in signers]

        return super().unmask_stage(_Relay(grid, add_signatures, lambda m: None), context, state)

    def _consistency_round(self, grid, context, state) -> dict[int, bytes]:
        """Every survivor signs the survivor set; returns node id -> signature."""
        group = str(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        survivors = sorted(state.active_node_ids)
        messages = [
            Message(
                content=RecordDict(
                    {
                        RECORD_KEY_CONFIGS: ConfigRecord(
                            {Key.STAGE: wire.CONSISTENCY, wire.SURVIVORS: survivors}
                        )
                    }
                ),
                dst_node_id=nid,
                message_type=MessageType.TRAIN,
                group_id=group,
            )
            for nid in survivors
        ]
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        signatures = {}
        for reply in replies:
            if reply.has_error():
                state.failures.append(Exception(reply.error))
                continue
            signature = _configs(reply).get(wire.SURVIVOR_SIGNATURE)
            if isinstance(signature, bytes):
                signatures[reply.metadata.src_node_id] = signature
        log(
            INFO,
            "SecAgg+ consistency round: %s of %s survivors signed",
            len(signatures),
            len(survivors),
        )
        return signatures

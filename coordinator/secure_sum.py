"""Flower's SecAgg+ workflow, with one fix for a client lost between two of its stages.

Flower 1.41 counts every node that sent its public keys as "dead" if it does not send a masked
update. But a node lost after sending its public keys and before sharing its key shares masked
nothing with anyone (nodes mask only with the peers whose shares they received), and no one holds
a share of its key: asking the others for those shares fails their unmask stage (a KeyError in
Flower's client mod), and the whole round with it. Such a node is simply not in the round.
"""

from __future__ import annotations

from flwr.server.workflow import SecAggPlusWorkflow


class SecureSumWorkflow(SecAggPlusWorkflow):
    def share_keys_stage(self, grid, context, state) -> bool:
        proceed = super().share_keys_stage(grid, context, state)
        # Those who shared their key shares: the round's members from here on.
        state.sampled_node_ids = set(state.active_node_ids)
        return proceed

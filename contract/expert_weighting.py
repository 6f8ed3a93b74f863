"""Expert-weighted aggregation: what a node sends and how the coordinator reads it.

FedAvg pulls every routed expert's factors toward every client's update, even from clients that
never routed a token to that expert (their update there is zero). Expert-weighted aggregation
weighs each expert's update by how much each client used it:

    update_e = sum_k c_ke delta_ke / sum_k c_ke      (experts no client used: no update)

A node sends one vector: its update with every routed-expert element multiplied by f_ke, followed
by the fractions f_ke themselves, f_ke = c_ke / P with c_ke its tokens routed to expert e and P
a public bound on them (steps x batch x sequence length x top-k: the same for every node, so f
weighs exactly as c does, and stays in [0, 1], inside secure aggregation's range). The
coordinator divides summed (or averaged) weighted updates by summed fractions, element by
element; under SecAgg+ both halves go through the masked sum, so it learns only totals.

`expert_of` maps each element of the adapter vector to its (layer, expert) slot, or -1 for the
attention and shared-expert factors, which are averaged as under FedAvg.
"""

from __future__ import annotations

import numpy as np

# Summed fractions below this count as "no client used the expert": SecAgg+ quantization leaves
# errors of ~1e-6 on them, and an expert that saw fewer than 1 in 10^4 slots learned nothing.
MIN_FRACTION = 1e-4


def weighted_release(delta: np.ndarray, expert_of: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """The vector a node sends: `delta` with its routed-expert elements scaled by their slot's
    fraction, then the fractions."""
    if delta.shape != expert_of.shape:
        raise ValueError(f"update of {delta.size} values, layout of {expert_of.size}")
    if not (np.all(fractions >= 0) and np.all(fractions <= 1)):
        raise ValueError("expert fractions must lie in [0, 1]")
    routed = expert_of >= 0
    scaled = delta.copy()
    scaled[routed] *= fractions[expert_of[routed]].astype(delta.dtype)
    return np.concatenate([scaled, fractions.astype(delta.dtype)])


def expert_weighted_update(aggregate: np.ndarray, expert_of: np.ndarray) -> np.ndarray:
    """The adapter update from the sum or average of nodes' weighted releases."""
    slots = aggregate.size - expert_of.size
    if slots < 0 or (expert_of >= slots).any():
        raise ValueError(f"aggregate of {aggregate.size} values does not fit the layout")
    update, totals = aggregate[: expert_of.size].astype(np.float64), aggregate[expert_of.size :]
    routed = expert_of >= 0
    used = totals[expert_of[routed]].astype(np.float64)
    update[routed] = np.where(
        used > MIN_FRACTION, update[routed] / np.maximum(used, MIN_FRACTION), 0
    )
    return update.astype(aggregate.dtype)

"""Expert-weighted aggregation: what a node sends and how the coordinator reads it.

FedAvg pulls every routed expert's factors toward every client's update, even from clients that
never routed a token to that expert (their update there is zero). Expert-weighted aggregation
weighs each expert's update by how much each client used it:

    update_e = sum_k c_ke delta_ke / sum_k c_ke      (experts no client used: no update)

A node sends one vector: its update with every routed-expert element multiplied by s f_ke,
followed by the fractions scaled by kappa, kappa f_ke. f_ke = c_ke / P, with c_ke its token slots
routed to expert e and P a public bound on them (steps x batch x sequence length x top-k: the same
for every node, so f weighs exactly as c does). The coordinator divides the summed (or averaged)
weighted updates by the summed fractions, element by element; under SecAgg+ both halves go
through the masked sum, so it learns only totals. Where the summed fractions are below `floor`,
the expert gets no update.

`s`, `kappa` and `floor` are public (`Weighting`): 1, 1 and MIN_FRACTION in a run without privacy.
Under enterprise-level DP with clip C, the node releases the whole vector, counts included, under
one clip and one noise: the weighted update is clipped to C / sqrt(2) (L2; C / 2 in L1 for
Laplace) and the counts to the same, so the vector's norm is at most C, the sensitivity the
accounting assumes for a plain update: the noise and epsilon are exactly a plain update's.
kappa is chosen so that the counts never reach their clip (a layer's fractions sum to at most 1,
each at most 1/top-k), which keeps the weights exact; s = E (routed experts per layer) weighs an
expert used at its uniform share 1/E like an unweighted update; the floor (half the uniform
share) keeps a noisy, near-zero sum of fractions from blowing an expert's update up.

`expert_of` maps each element of the adapter vector to its (layer, expert) slot, or -1 for the
attention and shared-expert factors, which are averaged as under FedAvg.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedmoe.privacy.mechanisms import clip_l1, clip_l2
from fedmoe.privacy.settings import EnterpriseLevel

# Summed fractions below this count as "no client used the expert": SecAgg+ quantization leaves
# errors of ~1e-6 on them, and an expert that saw fewer than 1 in 10^4 slots learned nothing.
MIN_FRACTION = 1e-4


def update_share(mechanism: str) -> float:
    """The share of the enterprise-level clip the weighted update gets (the counts get the rest):
    C / sqrt(2) of an L2 clip, C / 2 of an L1 clip."""
    return 0.5 if mechanism == "laplace" else 1 / math.sqrt(2)


@dataclass(frozen=True)
class Weighting:
    """The public scales of the weighted release (module docstring)."""

    expert_scale: float = 1.0  # s
    count_scale: float = 1.0  # kappa
    floor: float = MIN_FRACTION
    # Under enterprise-level DP: each half's clip, and its norm (2: L2, 1: L1).
    half_clip: float | None = None
    norm: int = 2

    @classmethod
    def for_round(
        cls, enterprise: EnterpriseLevel | None, layers: int, experts: int, top_k: int
    ) -> Weighting:
        """The scales of a round with enterprise-level privacy `enterprise` (None: off), for
        `layers` layers of `experts` routed experts, `top_k` per token."""
        if enterprise is None:
            return cls()
        half = enterprise.clip * update_share(enterprise.mechanism)
        if enterprise.mechanism == "laplace":
            counts_max = layers  # L1: a layer's fractions sum to <= 1
        else:  # L2: at most top_k fractions of 1 / top_k per layer
            counts_max = math.sqrt(layers / top_k)
        return cls(
            expert_scale=float(experts),
            count_scale=half / counts_max,
            floor=1 / (2 * experts),
            half_clip=half,
            norm=1 if enterprise.mechanism == "laplace" else 2,
        )


def weighting_of_layout(
    enterprise: EnterpriseLevel | None, expert_of: np.ndarray, layers: list[int], top_k: int
) -> Weighting:
    """`Weighting.for_round` of a model's expert layout (`model.lora.expert_slots`); plain where
    no routed expert has LoRA (then nothing is weighted)."""
    if not layers:
        return Weighting()
    experts = (int(expert_of.max()) + 1) // len(layers)
    return Weighting.for_round(enterprise, len(layers), experts, top_k)


def weighted_release(
    delta: np.ndarray, expert_of: np.ndarray, fractions: np.ndarray, weighting: Weighting
) -> np.ndarray:
    """The vector a node sends: `delta` with its routed-expert elements scaled by s times their
    slot's fraction, then the fractions times kappa."""
    if delta.shape != expert_of.shape:
        raise ValueError(f"update of {delta.size} values, layout of {expert_of.size}")
    if not (np.all(fractions >= 0) and np.all(fractions <= 1)):
        raise ValueError("expert fractions must lie in [0, 1]")
    routed = expert_of >= 0
    scaled = delta.copy()
    weights = weighting.expert_scale * fractions[expert_of[routed]]
    scaled[routed] *= weights.astype(delta.dtype)
    counts = weighting.count_scale * fractions
    if weighting.half_clip is not None:
        clip = clip_l1 if weighting.norm == 1 else clip_l2
        (scaled,), _ = clip([scaled], weighting.half_clip)
        (counts,), _ = clip([counts], weighting.half_clip)  # never binds on real counts
    return np.concatenate([scaled, counts.astype(delta.dtype)])


def expert_weighted_update(
    aggregate: np.ndarray, expert_of: np.ndarray, weighting: Weighting
) -> np.ndarray:
    """The adapter update from the sum or average of nodes' weighted releases."""
    slots = aggregate.size - expert_of.size
    if slots < 0 or (expert_of >= slots).any():
        raise ValueError(f"aggregate of {aggregate.size} values does not fit the layout")
    update = aggregate[: expert_of.size].astype(np.float64)
    totals = aggregate[expert_of.size :].astype(np.float64) / weighting.count_scale
    routed = expert_of >= 0
    used = totals[expert_of[routed]]
    divisor = weighting.expert_scale * np.maximum(used, weighting.floor)
    update[routed] = np.where(used > weighting.floor, update[routed] / divisor, 0)
    return update.astype(aggregate.dtype)

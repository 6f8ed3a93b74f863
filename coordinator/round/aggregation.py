"""Aggregation math, as pure functions over lists of arrays (testable without Flower)."""

from __future__ import annotations

import numpy as np

from fedmoe.privacy.mechanisms import l2_norm  # noqa: F401 - the one joint-norm helper, re-exported


class MalformedUpdate(ValueError):
    """A client update that must not be aggregated (wrong shapes, NaN/inf, bad weight)."""


def check_update(update: list[np.ndarray], reference: list[np.ndarray], weight: float) -> None:
    """Raise MalformedUpdate unless `update` matches `reference` tensor for tensor and is finite."""
    if not (np.isfinite(weight) and weight > 0):
        raise MalformedUpdate(f"example count must be a positive number, got {weight}")
    if len(update) != len(reference):
        raise MalformedUpdate(f"expected {len(reference)} tensors, got {len(update)}")
    for i, (u, r) in enumerate(zip(update, reference, strict=True)):
        if u.shape != r.shape:
            raise MalformedUpdate(f"tensor {i}: expected shape {r.shape}, got {u.shape}")
        if not np.all(np.isfinite(u)):
            raise MalformedUpdate(f"tensor {i} holds NaN or inf")


def weighted_average(updates: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """FedAvg: sum_k w_k u_k / sum_k w_k, tensor by tensor, accumulated in float64."""
    if not updates:
        raise ValueError("no updates to average")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out = []
    for tensors in zip(*updates, strict=True):
        acc = np.zeros(tensors[0].shape, dtype=np.float64)
        for t, w in zip(tensors, weights, strict=True):
            acc += float(w) * t.astype(np.float64)
        out.append((acc / total).astype(tensors[0].dtype))
    return out


def apply_update(
    global_tensors: list[np.ndarray], delta: list[np.ndarray], lr: float = 1.0
) -> list[np.ndarray]:
    """The global adapter plus `lr` x the aggregated delta (the server learning rate)."""
    return [(g + lr * d.astype(g.dtype)) for g, d in zip(global_tensors, delta, strict=True)]

"""The training objective and its evaluation, the same on every node and on the coordinator."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.model.data import PADDING


def per_sequence_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence over its non-PADDING targets: [B]. Unlike
    HF's `labels=` loss it does not average over the whole batch's tokens, so one example's loss
    never depends on another's."""
    logits = model(input_ids=input_ids.clamp(min=0)).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        reduction="none",
        ignore_index=PADDING,
    )
    real = (targets != PADDING).sum(dim=1).clamp(min=1)
    return token_loss.view(targets.shape).sum(dim=1) / real


def autocast_context(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, rows: torch.Tensor, batch_size: int, device: torch.device
) -> float:
    """Mean per-sequence loss over all `rows` (records or blocks)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start : start + batch_size].to(device)
        with autocast_context(device):
            total += per_sequence_loss(model, batch).sum().item()
        count += batch.shape[0]
    return total / count

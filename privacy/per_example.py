"""Exact per-example gradients of the adapter tensors with torch.func.

Opacus's own per-sample machinery treats routed tokens as samples on MoE experts (silently wrong
clipping); instead the whole model is differentiated per example with `vmap(grad(...))` over the
batch, then clipping and noise act on these gradients. Each example's loss is its own
per-sequence mean, so no example's gradient depends on another's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedmoe.model.lora import adapter_parameters


def _sequence_loss(model: nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    logits = functional_call(model, params, args=(), kwargs={"input_ids": input_ids.unsqueeze(0)}).logits[0, :-1]
    return F.cross_entropy(logits.float(), input_ids[1:])


def per_example_gradients(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{adapter tensor name: [B, *shape] gradients}, one row per sequence of `input_ids` [B, T]."""
    params = {name: p.detach() for name, p in adapter_parameters(model).items()}
    if not params:
        raise RuntimeError("the model has no trainable adapter tensors")
    return vmap(grad(lambda p, ids: _sequence_loss(model, p, ids)), in_dims=(None, 0), randomness="different")(params, input_ids)

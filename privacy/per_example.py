"""Exact per-example gradients of the adapter tensors from ONE batched forward and backward pass.

Every adapter tensor W enters the model through token-wise linear maps: peft's LoRA factors
(`nn.Linear` without bias, y = x W^T) and the routed-expert factors of `ExpertLoRA` (one einsum
each, see model/expert_lora.py). The gradient of a loss w.r.t. W is then a contraction of the map's
input x with the gradient g of its output, summed over tokens. The loss here is the sum of the
examples' own per-sequence losses, and examples do not interact in the forward pass (no batch
statistics, no router auxiliary loss: DeepSeek-V3 has none), so the rows of g that belong to
example b are exactly the gradient of b's loss; summing over b's tokens alone gives b's gradient.

So one forward pass records (x, y) for every use of an adapter tensor, one `torch.autograd.grad`
gives all the g, and one batched einsum per use gives the per-example gradients. That costs about
an ordinary backward pass; `vmap(grad(...))` over the batch (torch.func) cost 1.5x the time and
1.6x the memory. Opacus's own per-sample hooks are not used: on MoE experts they treat routed
tokens as samples (silently wrong clipping).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from fedmoe.client.trainer import per_sequence_loss
from fedmoe.model.expert_lora import ExpertLoRA
from fedmoe.model.lora import adapter_parameters

LINEAR = "ni,oi->no"  # nn.Linear without bias, as an einsum over tokens n


@dataclass
class _Use:
    """output = einsum(equation, tokens, weight), the token index `n` first in tokens and output."""

    weight: torch.Tensor
    equation: str
    tokens: torch.Tensor
    output: torch.Tensor


def _by_example(t: torch.Tensor, subscripts: str, batch: int) -> torch.Tensor:
    # The leading dims of t hold the tokens, example-major (checked when recorded): [B, tokens, rest].
    rest = t.shape[t.dim() - (len(subscripts) - 1) :]
    return t.reshape(batch, -1, *rest)


def _per_example_grad(use: _Use, out_grad: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, *weight.shape]: the weight gradient of `use`, summed over each example's tokens only."""
    operands, out_sub = use.equation.split("->")
    tokens_sub, weight_sub = operands.split(",")
    return torch.einsum(
        f"b{out_sub},b{tokens_sub}->b{weight_sub}",
        _by_example(out_grad, out_sub, batch),
        _by_example(use.tokens, tokens_sub, batch),
    )


@contextlib.contextmanager
def _recording(model: nn.Module, batch: int, seq_len: int) -> Iterator[list[_Use]]:
    """Records every use of a trainable `nn.Linear` weight or `ExpertLoRA` factor while active."""
    uses: list[_Use] = []

    def record(weight: torch.Tensor, equation: str, tokens: torch.Tensor, output: torch.Tensor) -> None:
        # Rows must be [B, ...] or [B*T, ...] (the MoE block flattens batch-first hidden states);
        # any other layout would mix examples when split by `_by_example`.
        if tokens.shape[0] not in (batch, batch * seq_len):
            raise RuntimeError(f"adapter input of shape {tuple(tokens.shape)} is not batch-first for a batch of {batch} x {seq_len}")
        uses.append(_Use(weight, equation, tokens, output))

    handles, experts = [], []
    for module in model.modules():
        if isinstance(module, ExpertLoRA):
            module.factor_hook = record
            experts.append(module)
        elif isinstance(module, nn.Linear) and module.weight.requires_grad:
            handles.append(module.register_forward_hook(lambda m, args, out: record(m.weight, LINEAR, args[0], out)))
    try:
        yield uses
    finally:
        for handle in handles:
            handle.remove()
        for module in experts:
            module.factor_hook = None


def per_example_gradients(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{adapter tensor name: [B, *shape] gradients}, one row per sequence of `input_ids` [B, T],
    each the gradient of that sequence's own `per_sequence_loss`."""
    params = adapter_parameters(model)
    if not params:
        raise RuntimeError("the model has no trainable adapter tensors")
    batch, seq_len = input_ids.shape
    with _recording(model, batch, seq_len) as uses:
        loss = per_sequence_loss(model, input_ids).sum()
    names = {id(p): name for name, p in params.items()}
    # A trainable tensor used in a way we do not record (a bias, a new adapter type) would get no
    # gradient at all: refuse rather than clip a wrong one.
    missing = params.keys() - {names.get(id(use.weight)) for use in uses}
    if missing:
        raise RuntimeError(f"no per-example gradient rule for adapter tensors {sorted(missing)[:3]} ({len(missing)} in all)")
    out_grads = torch.autograd.grad(loss, [use.output for use in uses])
    grads: dict[str, torch.Tensor] = {}
    for use, out_grad in zip(uses, out_grads):
        name = names[id(use.weight)]
        g = _per_example_grad(use, out_grad, batch)
        grads[name] = grads[name] + g if name in grads else g
    return {name: grads[name].contiguous() for name in params}

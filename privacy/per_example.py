"""Exact per-example gradients of the adapter tensors from ONE batched forward and backward pass.

Every adapter tensor W enters the model through token-wise linear maps: peft's LoRA factors
(`nn.Linear` without bias, y = x W^T) and the routed-expert factors of `ExpertLoRA` (one einsum
each, see model/expert_lora.py). The gradient of a loss w.r.t. W is then a contraction of the map's
input x with the gradient g of its output, summed over tokens. The loss here is the sum of the
examples' own per-sequence losses, and examples do not interact in the forward pass (no batch
statistics, no router auxiliary loss: DeepSeek-V3 has none), so the rows of g that belong to
example b are exactly the gradient of b's loss; summing over b's tokens alone gives b's gradient.

So for one forward pass every such map is computed by `_PerExampleLinear` / `_PerExampleEinsum`,
whose backward returns the usual input gradient and, in place of the batch gradient of W, stores
the [B, *W.shape] per-example one. One ordinary backward pass then yields them all, at about the
time and memory of the non-private step (`vmap(grad(...))` over the batch, the torch.func way,
made the DP step 1.5x slower and 1.6x bigger than a plain one). Opacus's own per-sample hooks are
not used: on MoE experts they treat routed tokens as samples (silently wrong clipping).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.model.expert_lora import ExpertLoRA
from fedmoe.model.lora import adapter_parameters
from fedmoe.model.loss import per_sequence_loss

Store = Callable[
    [torch.Tensor, torch.Tensor], None
]  # (weight, its [B, *shape] per-example gradient)


def _check_rows(tokens: torch.Tensor, batch: int, seq_len: int) -> None:
    # Rows must be [B, ...] or [B*T, ...] (the MoE block flattens batch-first hidden states):
    # any other layout would mix examples in `_by_example`.
    if tokens.shape[0] not in (batch, batch * seq_len):
        raise RuntimeError(
            f"adapter input of shape {tuple(tokens.shape)} is not batch-first for a batch of {batch} x {seq_len}"
        )


def _by_example(t: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, rows of one example, ...] view of example-major rows [B*R, ...]."""
    return t.reshape(batch, -1, *t.shape[1:])


class _PerExampleLinear(torch.autograd.Function):
    """F.linear(x, weight) without bias, x [B, ..., in]; the backward pass stores each example's
    [out, in] gradient of `weight` instead of returning the batch sum."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, batch: int, store: Store
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.batch, ctx.store = batch, store
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_rows = _by_example(
            grad_out.reshape(-1, grad_out.shape[-1]), ctx.batch
        )  # [B, tokens, out]
        x_rows = _by_example(x.reshape(-1, x.shape[-1]), ctx.batch)
        ctx.store(weight, torch.bmm(grad_rows.transpose(1, 2), x_rows))
        return grad_x, None, None, None


@functools.cache
def _einsum_backward_equations(equation: str) -> tuple[str, str]:
    """(input gradient, per-example weight gradient) equations for einsum(equation, tokens, weight)."""
    operands, out = equation.split("->")
    tokens, weight = operands.split(",")
    # The input gradient einsum(output, weight -> tokens) is only right if every token index
    # survives into the output or the weight; `n` indexes tokens, `b` is taken for examples.
    if (
        not set(tokens) <= set(out + weight)
        or tokens[0] != "n"
        or out[0] != "n"
        or "n" in weight
        or "b" in equation
    ):
        raise ValueError(f"unsupported adapter einsum {equation!r}")
    return f"{out},{weight}->{tokens}", f"b{out},b{tokens}->b{weight}"


class _PerExampleEinsum(torch.autograd.Function):
    """einsum(equation, tokens, weight) with tokens [B*T, ...] indexed `n` (first) in tokens and
    output; the backward pass stores each example's gradient of `weight` instead of the batch sum."""

    @staticmethod
    def forward(
        ctx, equation: str, tokens: torch.Tensor, weight: torch.Tensor, batch: int, store: Store
    ) -> torch.Tensor:
        ctx.save_for_backward(tokens, weight)
        ctx.equation, ctx.batch, ctx.store = equation, batch, store
        return torch.einsum(equation, tokens, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        tokens, weight = ctx.saved_tensors
        input_equation, per_example_equation = _einsum_backward_equations(ctx.equation)
        grad_tokens = (
            torch.einsum(input_equation, grad_out, weight) if ctx.needs_input_grad[1] else None
        )
        ctx.store(
            weight,
            torch.einsum(
                per_example_equation,
                _by_example(grad_out, ctx.batch),
                _by_example(tokens, ctx.batch),
            ),
        )
        return None, grad_tokens, None, None, None


@contextlib.contextmanager
def _per_example_mode(
    model: nn.Module, batch: int, seq_len: int, store: Store, used: set[int]
) -> Iterator[None]:
    """While active, every trainable `nn.Linear` weight and `ExpertLoRA` factor goes through the
    functions above; `used` collects the ids of the weights that did."""

    def linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _check_rows(x, batch, seq_len)
        used.add(id(weight))
        return _PerExampleLinear.apply(x, weight, batch, store)

    def einsum(equation: str, tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        _check_rows(tokens, batch, seq_len)
        _einsum_backward_equations(
            equation
        )  # rejects an unsupported equation before the backward pass
        used.add(id(weight))
        return _PerExampleEinsum.apply(equation, tokens, weight, batch, store)

    linears, experts = [], []
    for module in model.modules():
        if isinstance(module, ExpertLoRA):
            experts.append((module, module.factor_einsum))
            module.factor_einsum = einsum
        elif isinstance(module, nn.Linear) and module.weight.requires_grad and module.bias is None:
            # An instance attribute shadows nn.Linear.forward; deleting it restores the class's.
            module.forward = functools.partial(linear, module.weight)
            linears.append(module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward
        for module, previous in experts:
            module.factor_einsum = previous


def per_example_gradients(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{adapter tensor name: [B, *shape] gradients}, one row per sequence of `input_ids` [B, T],
    each the gradient of that sequence's own `per_sequence_loss`."""
    params = adapter_parameters(model)
    if not params:
        raise RuntimeError("the model has no trainable adapter tensors")
    names = {id(p): name for name, p in params.items()}
    grads: dict[str, torch.Tensor] = {}
    used: set[int] = set()

    def store(weight: torch.Tensor, per_example: torch.Tensor) -> None:
        # Contiguous now, while the einsum's permuted result is the only copy: clipping flattens it.
        name = names[id(weight)]
        grads[name] = grads[name] + per_example if name in grads else per_example.contiguous()

    with _per_example_mode(model, *input_ids.shape, store, used):
        loss = per_sequence_loss(model, input_ids).sum()
    # A trainable tensor used some other way (a bias, a new adapter type) would get no per-example
    # gradient: refuse rather than clip a wrong one.
    missing = sorted(name for name, p in params.items() if id(p) not in used)
    if missing:
        raise RuntimeError(
            f"no per-example gradient rule for adapter tensors {missing[:3]} ({len(missing)} in all)"
        )
    loss.backward()
    if grads.keys() != params.keys():  # e.g. activation checkpointing re-ran the forward without us
        raise RuntimeError(
            f"the backward pass gave no per-example gradient for {sorted(params.keys() - grads.keys())[:3]}"
        )
    return {name: grads[name] for name in params}

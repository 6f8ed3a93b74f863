"""Exact per-example gradients of the adapter tensors from ONE batched forward and backward pass.

Every adapter tensor W enters the model through token-wise linear maps: peft's LoRA factors
(`nn.Linear` without bias, y = x W^T) and the routed-expert factors of `ExpertLoRA` (one grouped
matmul each over token-expert rows, see model/expert_lora.py). The gradient of a loss w.r.t. W
is then a contraction of the map's input x with the gradient g of its output, summed over
tokens. The loss here is the sum of the examples' own per-sequence losses, and examples do not
interact in the forward pass (no batch statistics, no router auxiliary loss: DeepSeek-V3 has
none), so the rows of g that belong to example b are exactly the gradient of b's loss; summing
over b's tokens alone gives b's gradient. An expert row knows its token, hence its example, so
the same holds for the sparse experts.

So for one forward pass every such map is computed by `_PerExampleLinear` /
`_PerExampleGroupedLinear`, whose backward returns the usual input gradient and, in place of the
batch gradient of W, stores the [B, *W.shape] per-example one. One ordinary backward pass then
yields them all, at about the time and memory of the non-private step (`vmap(grad(...))` over
the batch, the torch.func way, made the DP step 1.5x slower and 1.6x bigger than a plain one).
Opacus's own per-sample hooks are not used: on MoE experts they treat routed tokens as samples
(silently wrong clipping).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.model.expert_lora import ExpertLoRA, ExpertRows, grouped_linear
from fedmoe.model.lora import adapter_parameters
from fedmoe.model.loss import per_sequence_loss

# Receives one weight's [B, *shape] per-example gradient. Bound to the weight's identity when the
# forward pass runs: checkpointing may hand the backward pass a recomputed copy of the weight.
Store = Callable[[torch.Tensor], None]


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
        ctx.store(torch.bmm(grad_rows.transpose(1, 2), x_rows))
        return grad_x, None, None, None


def _per_example_grouped_gradient(
    grad_out: torch.Tensor,
    rows: torch.Tensor,
    groups: ExpertRows,
    example: torch.Tensor,
    batch: int,
) -> torch.Tensor:
    """[B, E, out, in]: for each example b and expert e, the sum over b's rows routed to e of
    grad_out_i x rows_i^T. Per expert, b's rows are scattered into a [B, width, ...] block
    (width: the most rows one example sent to e) and contracted by one batched matmul. Every
    row's place in its block, and every block's width, are found for all experts at once: what
    is left per expert is the scatter and the matmul (on a small model the per-expert work is
    most of what exact per-example gradients add to a step)."""
    num_experts = len(groups.counts)
    expert = torch.repeat_interleave(
        torch.arange(num_experts, device=rows.device),
        torch.tensor(groups.counts, device=rows.device),
    )
    # Rows of an expert are in token order, so each (expert, example) pair's rows are contiguous.
    segment = expert * batch + example
    sizes = torch.bincount(segment, minlength=num_experts * batch)
    position = torch.arange(len(segment), device=rows.device) - (sizes.cumsum(0) - sizes)[segment]
    widths = sizes.view(num_experts, batch).amax(dim=1).tolist()
    result = rows.new_zeros(batch, num_experts, grad_out.shape[1], rows.shape[1])
    start = 0
    for e, (count, width) in enumerate(zip(groups.counts, widths, strict=True)):
        end = start + count
        if count:
            block = example[start:end], position[start:end]
            g = grad_out.new_zeros(batch, width, grad_out.shape[1])
            x = rows.new_zeros(batch, width, rows.shape[1])
            g[block] = grad_out[start:end]
            x[block] = rows[start:end]
            result[:, e] = torch.bmm(g.transpose(1, 2), x)
        start = end
    return result


class _PerExampleGroupedLinear(torch.autograd.Function):
    """grouped_linear(rows, weight, groups) whose backward pass stores each example's
    [E, out, in] gradient of `weight` instead of returning the batch sum."""

    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,
        weight: torch.Tensor,
        groups: ExpertRows,
        seq_len: int,
        batch: int,
        store: Store,
    ) -> torch.Tensor:
        ctx.save_for_backward(rows, weight)
        ctx.groups, ctx.seq_len, ctx.batch, ctx.store = groups, seq_len, batch, store
        return grouped_linear(rows, weight, groups)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, weight = ctx.saved_tensors
        groups = ctx.groups
        grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.cat(
                [
                    g @ w
                    for g, w in zip(grad_out.split(groups.counts), weight.unbind(0), strict=True)
                ]
            )
        # Tokens are batch-first [B*T] (checked when the forward ran): token // T is the example.
        example = groups.token // ctx.seq_len
        ctx.store(_per_example_grouped_gradient(grad_out, rows, groups, example, ctx.batch))
        return grad_rows, None, None, None, None, None


@contextlib.contextmanager
def _per_example_mode(
    model: nn.Module,
    batch: int,
    seq_len: int,
    store: Callable[[int, torch.Tensor], None],
    used: set[int],
) -> Iterator[None]:
    """While active, every trainable `nn.Linear` weight and `ExpertLoRA` factor goes through the
    functions above; `used` collects the ids of the weights that did."""

    def linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _check_rows(x, batch, seq_len)
        used.add(id(weight))
        return _PerExampleLinear.apply(x, weight, batch, functools.partial(store, id(weight)))

    def grouped(rows: torch.Tensor, weight: torch.Tensor, groups: ExpertRows) -> torch.Tensor:
        if groups.num_tokens != batch * seq_len:
            raise RuntimeError(
                f"expert rows over {groups.num_tokens} tokens are not batch-first for a batch of {batch} x {seq_len}"
            )
        used.add(id(weight))
        return _PerExampleGroupedLinear.apply(
            rows, weight, groups, seq_len, batch, functools.partial(store, id(weight))
        )

    linears, experts = [], []
    for module in model.modules():
        if isinstance(module, ExpertLoRA):
            experts.append((module, module.factor_matmul))
            module.factor_matmul = grouped
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
            module.factor_matmul = previous


def per_example_gradients(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{adapter tensor name: [B, *shape] gradients}, one row per sequence of `input_ids` [B, T],
    each the gradient of that sequence's own `per_sequence_loss`."""
    return per_example_gradients_of(
        model, *input_ids.shape, lambda: per_sequence_loss(model, input_ids)
    )


def per_example_gradients_of(
    model: nn.Module, batch: int, seq_len: int, per_example_loss: Callable[[], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """{adapter tensor name: [B, *shape] gradients} of the [B] losses `per_example_loss()` computes
    from batch-first inputs [B, T] (example b's loss may depend only on b's rows)."""
    params = adapter_parameters(model)
    if not params:
        raise RuntimeError("the model has no trainable adapter tensors")
    names = {id(p): name for name, p in params.items()}
    grads: dict[str, torch.Tensor] = {}
    used: set[int] = set()

    def store(weight_id: int, per_example: torch.Tensor) -> None:
        # Clipping flattens each gradient: keep it contiguous.
        name = names[weight_id]
        grads[name] = grads[name] + per_example if name in grads else per_example.contiguous()

    # The backward pass runs in per-example mode too: activation checkpointing re-runs parts of
    # the forward pass in it, and must re-run them the same way.
    with _per_example_mode(model, batch, seq_len, store, used):
        loss = per_example_loss().sum()
        # A trainable tensor used some other way (a bias, a new adapter type) would get no
        # per-example gradient: refuse rather than clip a wrong one.
        missing = sorted(name for name, p in params.items() if id(p) not in used)
        if missing:
            raise RuntimeError(
                f"no per-example gradient rule for adapter tensors {missing[:3]} ({len(missing)} in all)"
            )
        loss.backward()
    if grads.keys() != params.keys():  # e.g. reentrant checkpointing re-ran the forward elsewhere
        raise RuntimeError(
            f"the backward pass gave no per-example gradient for {sorted(params.keys() - grads.keys())[:3]}"
        )
    return {name: grads[name] for name in params}

"""LoRA for the routed experts of a MoE layer, computed sparsely.

transformers stores routed experts as fused 3-D parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]); peft reaches them only through a parametrization that neither Opacus nor
our per-example gradients can handle. `ExpertLoRA` keeps the frozen base experts and adds explicit
per-expert factors:

    gate_up_e(x) = W_gu[e] x + s * B_gu[e] A_gu[e] x
    down_e(a)    = W_d[e]  a + s * B_d[e]  A_d[e]  a          (s = alpha / r)

Sparse: each (token, chosen expert) pair is one row, rows are grouped by expert (`ExpertRows`), and
every expert's base weights and LoRA factors multiply only the rows routed to it. FLOPs and
activation memory grow with top-k, not with the number of experts E (on DeepSeek-V2-Lite the dense
form below costs E/k = 10.7x the expert FLOPs; on V3, 32x).

Each LoRA factor enters through exactly one grouped matmul, `ExpertLoRA.factor_matmul(rows,
factor, groups)`. privacy/per_example.py swaps in one whose backward pass yields every example's
gradient of the factor (each row knows its token, hence its example).

`dense_routed_experts_forward` is the same function written with data-independent tensor ops
(every expert evaluated for every token, routing by one-hot masks). It wins nowhere we measured
(7x slower on a V2-Lite block, 1.4x on the embedded base: benchmarks/), but `torch.func.vmap` can
batch it, so tests and benchmarks keep it as an independent reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedmoe.model.quantize import QuantizedWeight

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ExpertRows:
    """Token-expert pairs grouped by expert: `counts[e]` consecutive rows for expert e, in token
    order within an expert. Row i is token `token[i]`, weighted by the router with `weight[i]`."""

    token: torch.Tensor  # [M] long, M = tokens x top-k
    weight: torch.Tensor  # [M]
    counts: tuple[int, ...]  # E Python ints: the loop bounds of a grouped matmul
    num_tokens: int


def group_by_expert(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
) -> ExpertRows:
    """Rows for tokens routed to `top_k_index` [N, k] with router weights `top_k_weights` [N, k]."""
    num_tokens, k = top_k_index.shape
    expert = top_k_index.reshape(-1)
    # Stable, so that within an expert rows stay in token order, hence grouped by example.
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=num_experts)
    return ExpertRows(
        order // k, top_k_weights.reshape(-1)[order], tuple(counts.tolist()), num_tokens
    )


def grouped_linear(
    rows: torch.Tensor, weight: torch.Tensor | QuantizedWeight, groups: ExpertRows
) -> torch.Tensor:
    """Row i times weight[expert of i] transposed: rows [M, in], weight [E, out, in] -> [M, out].

    Plain autograd: `split` and `unbind` backpropagate as one `cat` and one `stack`."""
    if isinstance(weight, QuantizedWeight):
        return _QuantizedGroupedLinear.apply(rows, weight, groups.counts)
    pieces = rows.split(groups.counts)
    return torch.cat([x @ w.T for x, w in zip(pieces, weight.unbind(0), strict=True)])


class _QuantizedGroupedLinear(torch.autograd.Function):
    """grouped_linear on frozen quantized experts: each expert is dequantized only while its rows
    are multiplied, forward and backward, so autograd keeps no full-precision copy."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: QuantizedWeight, counts: tuple[int, ...]):
        ctx.weight, ctx.counts = weight, counts
        return _each_expert(rows, weight, counts, lambda x, w: x @ w.T, weight.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = ctx.weight
        grad_rows = _each_expert(grad_out, weight, ctx.counts, lambda g, w: g @ w, weight.shape[2])
        return grad_rows, None, None


def _each_expert(rows, weight: QuantizedWeight, counts, matmul, out_features: int) -> torch.Tensor:
    dequantize = weight.dequantizer()
    return torch.cat(
        [
            matmul(x, dequantize(e)) if len(x) else x.new_zeros(0, out_features)
            for e, x in enumerate(rows.split(counts))
        ]
    )


FactorMatmul = Callable[[torch.Tensor, torch.Tensor, ExpertRows], torch.Tensor]


def routed_experts_forward(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn,
    lora: Factors | None = None,
    scaling: float = 1.0,
    dropout: nn.Module | None = None,
    factor_matmul: FactorMatmul = grouped_linear,
) -> torch.Tensor:
    """Output [N, H] of the routed experts for tokens `x` [N, H] routed to `top_k_index` [N, k].

    `lora` is (A_gu [E,r,H], B_gu [E,2I,r], A_d [E,r,I], B_d [E,H,r]) or None for the base experts.
    """
    groups = group_by_expert(top_k_index, top_k_weights, gate_up_proj.shape[0])

    def low_rank(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # The factors may be float32 over a bfloat16 base: LoRA computes in the factors' dtype.
        t = dropout(t) if dropout is not None else t
        out = factor_matmul(factor_matmul(t.to(a.dtype), a, groups), b, groups)
        return scaling * out.to(x.dtype)

    rows = x[groups.token]  # [M, H]
    h = grouped_linear(rows, gate_up_proj, groups)  # [M, 2I]
    if lora is not None:
        a_gu, b_gu, a_d, b_d = lora
        h = h + low_rank(rows, a_gu, b_gu)
    gate, up = h.chunk(2, dim=-1)
    # Weighted by the router before the down projection (linear, so the same as after it), so
    # that the down LoRA sees what the base down projection sees.
    act = act_fn(gate) * up * groups.weight.to(x.dtype).unsqueeze(-1)  # [M, I]
    out = grouped_linear(act, down_proj, groups)
    if lora is not None:
        out = out + low_rank(act, a_d, b_d)
    return torch.zeros_like(x).index_add(0, groups.token, out)


def dense_routed_experts_forward(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn,
    lora: Factors | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """`routed_experts_forward` evaluating all E experts for every token (no dropout)."""
    n_tokens, hidden = x.shape
    num_experts, two_inter, _ = gate_up_proj.shape
    # [N, k, E] routing one-hot; a comparison instead of F.one_hot keeps it vmap-friendly.
    onehot = (top_k_index.unsqueeze(-1) == torch.arange(num_experts, device=x.device)).to(x.dtype)
    h_all = (x @ gate_up_proj.reshape(num_experts * two_inter, hidden).T).view(
        n_tokens, num_experts, two_inter
    )
    h = torch.einsum("nse,nef->nsf", onehot, h_all)  # each slot's expert: [N, k, 2I]
    if lora is not None:
        a_gu, b_gu, a_d, b_d = lora
        xa = torch.einsum("nh,erh->ner", x, a_gu)  # [N, E, r]
        h = h + scaling * torch.einsum("nse,ner,efr->nsf", onehot, xa, b_gu)
    gate, up = h.chunk(2, dim=-1)
    act = act_fn(gate) * up  # [N, k, I]
    # Each slot's activation placed at its expert, weighted by the router: [N, E, I].
    act_e = torch.einsum("nse,ns,nsi->nei", onehot, top_k_weights.to(x.dtype), act)
    out = act_e.reshape(n_tokens, -1) @ down_proj.permute(0, 2, 1).reshape(-1, hidden)
    if lora is not None:
        aa = torch.einsum("nei,eri->ner", act_e, a_d)
        out = out + scaling * torch.einsum("ner,ehr->nh", aa, b_d)
    return out


def is_fused_experts(module: nn.Module) -> bool:
    """True for fused routed-expert modules (3-D gate_up_proj and down_proj): transformers' own
    and their quantized form (model/quantize.py)."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return all(
        isinstance(w, QuantizedWeight) or (isinstance(w, torch.Tensor) and w.dim() == 3)
        for w in (gate_up, down)
    )


class ExpertLoRA(nn.Module):
    """Frozen fused routed experts plus trainable per-expert LoRA factors.

    Parameter names deliberately avoid the substring "lora_": peft treats every such parameter as
    its own and would save, load and freeze it.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not is_fused_experts(base):
            raise TypeError(
                f"ExpertLoRA needs fused experts (3-D gate_up_proj/down_proj), got {type(base).__name__}"
            )
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        num_experts, two_inter, hidden = base.gate_up_proj.shape
        inter = base.down_proj.shape[2]
        # LoRA in full precision over a bfloat16 or int8 base.
        dtype = torch.promote_types(base.gate_up_proj.dtype, torch.float32)
        device = base.gate_up_proj.device
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.gate_up_A = nn.Parameter(
            torch.empty(num_experts, r, hidden, dtype=dtype, device=device)
        )
        self.gate_up_B = nn.Parameter(
            torch.zeros(num_experts, two_inter, r, dtype=dtype, device=device)
        )
        self.down_A = nn.Parameter(torch.empty(num_experts, r, inter, dtype=dtype, device=device))
        self.down_B = nn.Parameter(torch.zeros(num_experts, hidden, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # The grouped matmul of every use of a factor; privacy/per_example.py replaces it for one
        # forward pass to get per-example gradients.
        self.factor_matmul: FactorMatmul = grouped_linear
        # Tests and benchmarks switch to the dense form (vmap-able; no dropout, no per-example rule).
        self.dense = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as peft's default LoRA: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so the
        # adapted model equals the base model until B moves.
        for a in (self.gate_up_A, self.down_A):
            bound = 1.0 / math.sqrt(a.shape[-1])
            nn.init.uniform_(a, -bound, bound)
        nn.init.zeros_(self.gate_up_B)
        nn.init.zeros_(self.down_B)

    def factors(self) -> Factors:
        return self.gate_up_A, self.gate_up_B, self.down_A, self.down_B

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        base = self.base
        args = (hidden_states, top_k_index, top_k_weights, base.gate_up_proj, base.down_proj)
        if self.dense:
            return dense_routed_experts_forward(
                *args, base.act_fn, lora=self.factors(), scaling=self.scaling
            )
        return routed_experts_forward(
            *args,
            base.act_fn,
            lora=self.factors(),
            scaling=self.scaling,
            dropout=self.dropout,
            factor_matmul=self.factor_matmul,
        )

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base experts with the LoRA product folded into their weights."""
        if isinstance(self.base.gate_up_proj, QuantizedWeight):
            raise ValueError("cannot merge LoRA into quantized experts: load the base unquantized")
        self.base.gate_up_proj += self.scaling * (self.gate_up_B @ self.gate_up_A)
        self.base.down_proj += self.scaling * (self.down_B @ self.down_A)
        return self.base

"""LoRA for the routed experts of a MoE layer.

transformers stores routed experts as fused 3-D parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]); peft reaches them only through a parametrization that neither Opacus nor
`torch.func.vmap` can handle. `ExpertLoRA` keeps the frozen base experts and adds explicit
per-expert factors:

    gate_up_e(x) = W_gu[e] x + s * B_gu[e] A_gu[e] x
    down_e(a)    = W_d[e]  a + s * B_d[e]  A_d[e]  a          (s = alpha / r)

The forward pass is written with dense, data-independent tensor ops (routing one-hots, no
Python loop over experts, no `nonzero`) so that per-example gradients can be taken with
`torch.func.vmap(grad(...))` over a batch. The price is that the base experts are evaluated for
all E experts and the routing selects (E/k more expert FLOPs than a grouped GEMM); the math is
kept in one function, `routed_experts_forward`, so a grouped kernel can replace it later.

Each LoRA factor enters through exactly one einsum whose first operand is indexed by token
(`n`), computed by `ExpertLoRA.factor_einsum`. privacy/per_example.py swaps in an einsum whose
backward pass yields every example's gradient of the factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def routed_experts_forward(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    scaling: float = 1.0,
    dropout: nn.Module | None = None,
    apply_factor: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor] = torch.einsum,
) -> torch.Tensor:
    """Output of the routed experts for tokens `x` [N, H] routed to `top_k_index` [N, k].

    `lora` is (A_gu [E,r,H], B_gu [E,2I,r], A_d [E,r,I], B_d [E,H,r]) or None for the base experts.
    `apply_factor(equation, tokens, factor)` computes each LoRA factor's einsum.
    """
    n_tokens, hidden = x.shape
    num_experts, two_inter, _ = gate_up_proj.shape
    inter = two_inter // 2
    # [N, k, E] routing one-hot; comparison instead of F.one_hot keeps it vmap-friendly. In the
    # einsums `s` indexes the k slots: a letter after `n`, because torch.einsum orders summed
    # indices alphabetically and per-example gradients then sum over (n, s) without a copy.
    experts = torch.arange(num_experts, device=x.device)
    onehot = (top_k_index.unsqueeze(-1) == experts).to(x.dtype)

    # Gate/up projection of every expert, then pick each slot's expert: [N, k, 2I].
    h_all = (x @ gate_up_proj.reshape(num_experts * two_inter, hidden).T).view(
        n_tokens, num_experts, two_inter
    )
    h = torch.einsum("nse,nef->nsf", onehot, h_all)
    if lora is not None:
        a_gu, b_gu, a_d, b_d = lora
        x_in = dropout(x) if dropout is not None else x
        xa = apply_factor("nh,erh->ner", x_in, a_gu)  # [N, E, r]
        z = onehot.unsqueeze(-1) * xa.unsqueeze(1)  # [N, k, E, r]: zero outside each slot's expert
        h = h + scaling * apply_factor("nser,efr->nsf", z, b_gu)

    gate, up = h.split(inter, dim=-1)
    act = act_fn(gate) * up  # [N, k, I]
    # Place each slot's activation at its expert, weighted by the router: [N, E, I].
    act_e = torch.einsum("nse,ns,nsi->nei", onehot, top_k_weights.to(x.dtype), act)
    out = act_e.reshape(n_tokens, num_experts * inter) @ down_proj.permute(0, 2, 1).reshape(
        num_experts * inter, hidden
    )
    if lora is not None:
        act_in = dropout(act_e) if dropout is not None else act_e
        aa = apply_factor("nei,eri->ner", act_in, a_d)  # [N, E, r]
        out = out + scaling * apply_factor("ner,ehr->nh", aa, b_d)
    return out


def is_fused_experts(module: nn.Module) -> bool:
    """True for transformers' fused routed-expert modules (3-D gate_up_proj and down_proj)."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
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
        dtype, device = base.gate_up_proj.dtype, base.gate_up_proj.device
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
        # einsum(equation, tokens, factor) for every use of a factor; privacy/per_example.py replaces
        # it for one forward pass to get per-example gradients.
        self.factor_einsum: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor] = torch.einsum
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as peft's default LoRA: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so the
        # adapted model equals the base model until B moves.
        for a in (self.gate_up_A, self.down_A):
            bound = 1.0 / math.sqrt(a.shape[-1])
            nn.init.uniform_(a, -bound, bound)
        nn.init.zeros_(self.gate_up_B)
        nn.init.zeros_(self.down_B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate_up_A, self.gate_up_B, self.down_A, self.down_B

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return routed_experts_forward(
            hidden_states,
            top_k_index,
            top_k_weights,
            self.base.gate_up_proj,
            self.base.down_proj,
            self.base.act_fn,
            lora=self.factors(),
            scaling=self.scaling,
            dropout=self.dropout,
            apply_factor=self.factor_einsum,
        )

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base experts with the LoRA product folded into their weights."""
        self.base.gate_up_proj += self.scaling * (self.gate_up_B @ self.gate_up_A)
        self.base.down_proj += self.scaling * (self.down_B @ self.down_A)
        return self.base

"""Weight-only int8 for the frozen routed experts, on any device.

The routed experts are most of a DeepSeek MoE's weights (V2-Lite: 14.4B of 15.7B parameters), and
transformers stores them as fused 3-D parameters, which bitsandbytes and torchao (both quantize
`nn.Linear` weights) do not reach; hence this small module of our own. Each expert's weight
[out, in] is stored as int8 with one absmax scale per output row; an expert is dequantized only
while its rows are multiplied, in the forward and again in the backward pass, so no full-precision
copy of the experts is ever kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Int8Rows:
    """An [E, out, in] weight: int8 `values` and `scales` [E, out] such that W[e] = values[e] * scales[e]."""

    values: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def dtype(self) -> torch.dtype:  # the dtype it computes in
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def expert(self, e: int) -> torch.Tensor:
        return self.values[e] * self.scales[e].unsqueeze(-1)


def quantize_rows(weight: torch.Tensor) -> Int8Rows:
    """Symmetric per-row int8: each row's largest magnitude maps to 127."""
    scales = weight.abs().amax(dim=-1).clamp(min=torch.finfo(weight.dtype).tiny) / 127
    values = torch.round(weight / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return Int8Rows(values, scales)


class Int8Experts(nn.Module):
    """transformers' fused routed experts with int8 weights (buffers: they are frozen and are part
    of the state dict, hence of the base's fingerprint)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        for name in ("gate_up_proj", "down_proj"):
            q = quantize_rows(getattr(experts, name).detach())
            self.register_buffer(f"{name}_values", q.values)
            self.register_buffer(f"{name}_scales", q.scales)
        self.act_fn = experts.act_fn

    @property
    def gate_up_proj(self) -> Int8Rows:
        return Int8Rows(self.gate_up_proj_values, self.gate_up_proj_scales)

    @property
    def down_proj(self) -> Int8Rows:
        return Int8Rows(self.down_proj_values, self.down_proj_scales)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        from fedmoe.model.expert_lora import routed_experts_forward

        return routed_experts_forward(
            hidden_states,
            top_k_index,
            top_k_weights,
            self.gate_up_proj,
            self.down_proj,
            self.act_fn,
        )


def quantize_experts(model: nn.Module) -> int:
    """Replace every fused routed-expert module of `model` by its int8 form; returns how many."""
    from fedmoe.model.expert_lora import is_fused_experts

    count = 0
    for module in list(model.modules()):
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.Module) and is_fused_experts(experts):
            module.experts = Int8Experts(experts)
            count += 1
    return count

"""Weight-only int8 and NF4 for the frozen routed experts, on any device.

The routed experts are most of a DeepSeek MoE's weights (V2-Lite: 14.4B of 15.7B parameters), and
transformers stores them as fused 3-D parameters, which bitsandbytes and torchao (both quantize
`nn.Linear` weights) do not reach; hence this small module of our own. Two schemes:

- int8: each expert's row [in] as int8 with one absmax scale (1 byte per weight);
- nf4: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023): blocks of 64 weights, each scaled by its
  absmax and rounded to the nearest of 16 levels placed at normal quantiles, two per byte
  (0.56 bytes per weight; the scales are not quantized again).

An expert is dequantized into one reused buffer only while its rows are multiplied, in the
forward and again in the backward pass, so no full-precision copy of the experts is ever kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# The 16 NF4 levels (QLoRA, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NF4_BLOCK = 64
SCHEMES = ("int8", "nf4")


@dataclass(frozen=True)
class QuantizedWeight:
    """A frozen [E, out, in] expert weight: `scheme`, its packed `values` and absmax `scales`."""

    scheme: str
    values: torch.Tensor  # int8 [E, out, in] or uint8 [E, out, in / 2] (two NF4 codes per byte)
    scales: torch.Tensor  # [E, out] (int8) or [E, out, in / block] (nf4)

    @property
    def shape(self) -> torch.Size:
        e, out, packed = self.values.shape
        return torch.Size((e, out, packed * (2 if self.scheme == "nf4" else 1)))

    @property
    def dtype(self) -> torch.dtype:  # the dtype it computes in
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def dequantizer(self) -> Callable[[int], torch.Tensor]:
        """e -> expert e's weight [out, in], written into one buffer that the next call reuses
        (a fresh tensor per expert lets the allocator's heap grow to all experts: +1.5 GB on one
        V2-Lite layer, measured)."""
        _, out, inputs = self.shape
        buffer = torch.empty(out, inputs, dtype=self.dtype, device=self.device)
        if self.scheme == "int8":

            def int8(e: int) -> torch.Tensor:
                return buffer.copy_(self.values[e]).mul_(self.scales[e].unsqueeze(-1))

            return int8
        # Each byte holds two codes: one lookup per byte gives both weights.
        levels = torch.tensor(NF4_LEVELS, dtype=self.dtype, device=self.device)
        pairs = torch.stack([levels.repeat(16), levels.repeat_interleave(16)], dim=1)
        codes = torch.empty(out * inputs // 2, dtype=torch.int32, device=self.device)
        blocks = self.scales.shape[2]

        def nf4(e: int) -> torch.Tensor:
            torch.index_select(
                pairs, 0, codes.copy_(self.values[e].view(-1)), out=buffer.view(-1, 2)
            )
            buffer.view(out, blocks, -1).mul_(self.scales[e].unsqueeze(-1))
            return buffer

        return nf4


def quantize(weight: torch.Tensor, scheme: str) -> QuantizedWeight:
    """`weight` [E, out, in] in `scheme` ("int8": symmetric per row; "nf4": per block of 64)."""
    tiny = torch.finfo(weight.dtype).tiny
    if scheme == "int8":
        scales = weight.abs().amax(dim=-1).clamp(min=tiny) / 127
        values = torch.round(weight / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(scheme, values, scales)
    experts, out, inputs = weight.shape
    if inputs % 2:
        raise ValueError(f"nf4 packs two weights per byte: input width {inputs} is odd")
    block = NF4_BLOCK if inputs % NF4_BLOCK == 0 else inputs
    levels = torch.tensor(NF4_LEVELS, dtype=weight.dtype, device=weight.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    scales = weight.view(experts, out, inputs // block, block).abs().amax(dim=-1).clamp(min=tiny)
    values = torch.empty(experts, out, inputs // 2, dtype=torch.uint8, device=weight.device)
    for e in range(experts):  # one expert at a time: the codes of a whole layer would not fit
        normalized = weight[e].view(out, -1, block) / scales[e].unsqueeze(-1)
        code = torch.bucketize(normalized.view(out, inputs), midpoints).to(torch.uint8)
        values[e] = code[:, 0::2] | (code[:, 1::2] << 4)
    return QuantizedWeight(scheme, values, scales)


def quantized_bytes(shape: torch.Size, scheme: str, element_size: int) -> int:
    """Bytes of an [E, out, in] weight quantized in `scheme`, its scales in `element_size` bytes."""
    experts, out, inputs = shape
    if scheme == "int8":
        return experts * out * (inputs + element_size)
    block = NF4_BLOCK if inputs % NF4_BLOCK == 0 else inputs
    return experts * out * (inputs // 2 + inputs // block * element_size)


class QuantizedExperts(nn.Module):
    """transformers' fused routed experts with quantized weights (buffers: they are frozen and are
    part of the state dict, hence of the base's fingerprint)."""

    def __init__(self, experts: nn.Module, scheme: str):
        super().__init__()
        self.scheme = scheme
        for name in ("gate_up_proj", "down_proj"):
            q = quantize(getattr(experts, name).detach(), scheme)
            self.register_buffer(f"{name}_values", q.values)
            self.register_buffer(f"{name}_scales", q.scales)
        self.act_fn = experts.act_fn

    @property
    def gate_up_proj(self) -> QuantizedWeight:
        return QuantizedWeight(self.scheme, self.gate_up_proj_values, self.gate_up_proj_scales)

    @property
    def down_proj(self) -> QuantizedWeight:
        return QuantizedWeight(self.scheme, self.down_proj_values, self.down_proj_scales)

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


def quantize_experts(model: nn.Module, scheme: str) -> int:
    """Replace every fused routed-expert module of `model` by its quantized form; returns how many."""
    from fedmoe.model.expert_lora import is_fused_experts

    count = 0
    for module in list(model.modules()):
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.Module) and is_fused_experts(experts):
            module.experts = QuantizedExperts(experts, scheme)
            count += 1
    return count

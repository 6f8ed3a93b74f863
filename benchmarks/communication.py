"""Bytes sent per client per round: LoRA adapter vs the full model.

Measured on the embedded base (the tensors a client really returns), and computed on paper for a
DeepSeek-V2-Lite-sized config (built on the meta device: shapes only, no memory, no download).

    python benchmarks/communication.py
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from fedmoe.model.base import load_base
from fedmoe.model.lora import adapter_parameters, attach_lora
from fedmoe.model.settings import LoraSettings

# DeepSeek-V2-Lite's published architecture (15.7B parameters, 64 routed experts, top-6).
DEEPSEEK_V2_LITE = dict(
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_shared_experts=2,
    n_routed_experts=64,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    n_group=1,
    topk_group=1,
    max_position_embeddings=4096,
)


def model_bytes(model, bytes_per_param: int) -> int:
    return sum(p.numel() for p in model.parameters()) * bytes_per_param


def adapter_bytes(model, settings: LoraSettings, bytes_per_param: int = 4) -> tuple[int, int]:
    adapted = attach_lora(model, settings)
    numel = sum(p.numel() for p in adapter_parameters(adapted).values())
    return numel, numel * bytes_per_param


def rows():
    # (label, model factory, bytes per base parameter, lora settings)
    yield "embedded base (fp32)", lambda: load_base("embedded"), 4, LoraSettings()
    yield (
        "embedded base, attention+shared only",
        lambda: load_base("embedded"),
        4,
        LoraSettings(targets=("attention", "shared_experts")),
    )

    def v2_lite():
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        with torch.device("meta"):
            return DeepseekV3ForCausalLM(DeepseekV3Config(**DEEPSEEK_V2_LITE))

    yield "DeepSeek-V2-Lite size (bf16 base), on paper", v2_lite, 2, LoraSettings()
    yield (
        "DeepSeek-V2-Lite size, top 20% of layers",
        v2_lite,
        2,
        LoraSettings(top_layers_fraction=0.2),
    )


def main() -> None:
    table = Table(title="bytes per client per round, each way (adapter in fp32)")
    for col in (
        "model",
        "base params",
        "full model MB",
        "adapter params",
        "adapter MB",
        "adapter / full",
    ):
        table.add_column(col, justify="right" if col != "model" else "left")
    for label, factory, base_bytes, settings in rows():
        model = factory()
        full = model_bytes(model, base_bytes)
        base_params = sum(p.numel() for p in model.parameters())
        numel, sent = adapter_bytes(model, settings)
        table.add_row(
            label,
            f"{base_params / 1e6:,.1f}M",
            f"{full / 1e6:,.1f}",
            f"{numel / 1e6:,.2f}M",
            f"{sent / 1e6:,.1f}",
            f"{sent / full:.4f}",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()

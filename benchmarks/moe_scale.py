"""Routed experts at real size: transformers' experts vs our dense and sparse expert LoRA, with and
without DP, on DeepSeek-V2-Lite-shaped MoE blocks (random weights).

    python benchmarks/moe_scale.py [--layers 1] [--batch 4] [--seq-len 128] [--steps 3]

Each block has V2-Lite's sizes: hidden 2048, 64 routed experts of width 1408, top-6 (greedy
softmax router), 2 shared experts. Inputs are random hidden states [B, T, 2048] that need a
gradient (as they would under LoRA on lower layers); the loss is a per-example linear function of
the blocks' output. Modes, one fresh process each (peak memory is the process's own):

- `transformers`: the model's own expert forward (config._experts_implementation), no LoRA;
- `dense` / `sparse`: LoRA r=8 on every group of the block (routed experts through our
  `ExpertLoRA`, shared experts through peft); dense evaluates all 64 experts for every token;
- `dense DP` / `sparse DP`: the same plus a DP-SGD step: exact per-example gradients of every
  adapter tensor (dense: torch.func vmap over the batch; sparse: privacy/per_example.py), clipping
  and noise;
- `sparse int8 experts` / `sparse nf4 experts`: `sparse` over routed experts stored as int8 or
  NF4 (`[model] quantize`).

Time is the median step; memory is the peak resident size during the steps minus the size before
them, per token. The last table gives a full-size V2-Lite adapter's bytes per client per round,
counted on the meta device (no weights).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from communication import DEEPSEEK_V2_LITE, adapter_bytes, model_bytes
from torch import nn

# The MoE block of DeepSeek-V2-Lite (benchmarks/communication.py holds the full architecture).
V2_LITE_MOE = {
    key: DEEPSEEK_V2_LITE[key]
    for key in (
        "hidden_size",
        "moe_intermediate_size",
        "n_routed_experts",
        "num_experts_per_tok",
        "n_shared_experts",
        "n_group",
        "topk_group",
    )
} | {"topk_method": "greedy"}
MODES = [
    "transformers",
    "dense",
    "sparse",
    "dense DP",
    "sparse DP",
    "sparse int8 experts",
    "sparse nf4 experts",
]


class Residual(nn.Module):
    """MoE blocks applied in turn with residual connections, as in the decoder."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = h + block(h)
        return h


def build_blocks(layers: int, lora: bool, quantize: str | None = None):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from fedmoe.model.lora import attach_lora, decoder_layers
    from fedmoe.model.quantize import quantize_experts
    from fedmoe.model.settings import LoraSettings

    config = DeepseekV2Config(
        **V2_LITE_MOE,
        num_hidden_layers=layers,
        first_k_dense_replace=0,
        vocab_size=256,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=None,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        intermediate_size=1408,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        model = DeepseekV2ForCausalLM(config)
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.mlp.gate.weight, 0, 0.02)  # V2's router starts at zero
        if quantize:
            quantize_experts(model, quantize)
    if lora:
        settings = LoraSettings(r=8, alpha=16, targets=("shared_experts", "routed_experts"))
        model = attach_lora(model, settings)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return model, Residual([layer.mlp for layer in decoder_layers(model)])


def measure(mode: str, layers: int, batch: int, seq_len: int, steps: int) -> dict:
    from fedmoe.model.lora import adapter_parameters, expert_lora_modules
    from fedmoe.privacy.dp_sgd import private_gradient
    from fedmoe.privacy.per_example import per_example_gradients_of

    torch.set_num_threads(2)
    scheme = next((s for s in ("int8", "nf4") if s in mode), None)
    model, blocks = build_blocks(layers, lora=mode != "transformers", quantize=scheme)
    for module in expert_lora_modules(model).values():
        module.dense = mode.startswith("dense")
    hidden = V2_LITE_MOE["hidden_size"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seq_len, hidden, generator=g).requires_grad_()
    target = torch.randn(batch, seq_len, hidden, generator=g)
    params = adapter_parameters(blocks)

    def losses(h: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return (blocks(h) * tgt).mean(dim=(-2, -1))  # [B]: example b's loss uses only b's rows

    def dense_per_example() -> dict[str, torch.Tensor]:
        from torch.func import functional_call, grad, vmap

        def one(p, xb, tb):
            return (functional_call(blocks, p, (xb.unsqueeze(0),)) * tb).mean()

        frozen = {k: v.detach() for k, v in params.items()}
        return vmap(grad(one), in_dims=(None, 0, 0))(frozen, x.detach(), target)

    # Building the model peaked higher (quantized: the float32 experts before); on Linux,
    # count the peak from here.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps + 1):
        model.zero_grad()
        x.grad = None
        start = time.perf_counter()
        if mode.endswith("DP"):
            per_example = (
                dense_per_example()
                if mode.startswith("dense")
                else per_example_gradients_of(blocks, batch, seq_len, lambda: losses(x, target))
            )
            grads = private_gradient(
                per_example, clip=1.0, noise_multiplier=1.0, expected_batch_size=batch
            )
            for name, p in params.items():
                p.grad = grads[name]
        else:
            losses(x, target).sum().backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "step_s": statistics.median(times[1:]),  # the first step warms up allocators and caches
        "mem_mb": (peak - rss_before) / 1024,
        "weights_mb": sum(t.numel() * t.element_size() for t in blocks.state_dict().values())
        / 2**20,
        "implementation": model.config._experts_implementation,
    }


def adapter_bytes_table() -> list[tuple[str, int, float]]:
    """(adapter, bytes per client per round, share of the bf16 base) for full-size V2-Lite."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from fedmoe.model.settings import LoraSettings

    rows = []
    for label, settings in [
        ("r=16, every group, every layer", LoraSettings()),
        ("r=16, every group, top 20% of layers", LoraSettings(top_layers_fraction=0.2)),
        ("r=8, every group, top 20% of layers", LoraSettings(r=8, top_layers_fraction=0.2)),
        (
            "r=16, attention and shared experts, every layer",
            LoraSettings(targets=("attention", "shared_experts")),
        ),
    ]:
        with torch.device("meta"):
            model = DeepseekV2ForCausalLM(
                DeepseekV2Config(**DEEPSEEK_V2_LITE, topk_method="greedy")
            )
            base = model_bytes(model, 2)
            _, size = adapter_bytes(model, settings)
        rows.append((label, size, size / base))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.layers, args.batch, args.seq_len, args.steps)))
        return
    tokens = args.batch * args.seq_len
    results = {}
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--mode", mode]
        for flag in ("layers", "batch", "seq_len", "steps"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-3000:]}", flush=True)
            continue
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode}: {r['step_s']:.2f} s, {r['mem_mb']:.0f} MB", flush=True)

    print(
        f"\n{args.layers} V2-Lite MoE block(s), batch {args.batch} x {args.seq_len} tokens, "
        "fp32, 2 CPU threads, forward + backward"
    )
    print(
        "| mode | step s | ms per token | vs transformers | MB per token | vs sparse | weights MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    reference, sparse = results.get("transformers"), results.get("sparse")
    for mode, r in results.items():
        name = f"transformers ({r['implementation']})" if mode == "transformers" else mode
        vs_hf = f"{r['step_s'] / reference['step_s']:.2f}x" if reference else "-"
        vs_sparse = (
            f"{r['step_s'] / sparse['step_s']:.2f}x time, {r['mem_mb'] / sparse['mem_mb']:.2f}x mem"
            if sparse
            else "-"
        )
        print(
            f"| {name} | {r['step_s']:.2f} | {1000 * r['step_s'] / tokens:.2f} | {vs_hf} "
            f"| {r['mem_mb'] / tokens:.3f} | {vs_sparse} | {r['weights_mb']:.0f} |"
        )
    print("\nFull-size DeepSeek-V2-Lite (15.7B), adapter bytes per client per round (fp32)")
    print("| adapter | MB | share of the bf16 base |")
    print("|---|---:|---:|")
    for label, size, share in adapter_bytes_table():
        print(f"| {label} | {size / 1e6:.0f} | {share:.2%} |")


if __name__ == "__main__":
    main()

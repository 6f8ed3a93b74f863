"""Routed experts at real size: transformers' experts vs our dense and sparse expert LoRA, with and
without DP, on DeepSeek-V2-Lite-shaped MoE blocks (random weights).

    python benchmarks/moe_scale.py [--layers 1] [--batch 4] [--seq-len 128] [--steps 3]
                                   [--device cpu|cuda] [--dtype float32|bfloat16] [--toy]

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

On `--device cuda` the blocks are built on the GPU, time is taken between
`torch.cuda.synchronize()` calls and memory is the allocator's peak above what was allocated
before the steps (`torch.cuda.max_memory_allocated`): resident size says nothing of GPU memory.
There the DP step's clipping and noise are those of training by default (Opacus's optimizer with
our noise, client/dp_trainer.py, `--dp-step optimizer`) rather than the reference function
`private_gradient`. `--toy` shrinks the blocks (hidden 64, 8 experts of width 32, top-2) for smoke
tests of these paths (benchmarks/gpu_check.py --dry-run).
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
# Smoke-test sizes: every code path of the real block, in milliseconds.
TOY_MOE = {
    "hidden_size": 64,
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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


def build_blocks(
    layers: int,
    lora: bool,
    quantize: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    shapes: dict = V2_LITE_MOE,
):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from fedmoe.model.lora import attach_lora, decoder_layers
    from fedmoe.model.quantize import quantize_experts
    from fedmoe.model.settings import LoraSettings

    config = DeepseekV2Config(
        **shapes,
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
    # Built where it runs: a V2-Lite layer's experts take seconds to initialise on a CPU.
    with torch.no_grad(), torch.device(device):
        model = DeepseekV2ForCausalLM(config).to(dtype)
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


def measure(
    mode: str,
    layers: int,
    batch: int,
    seq_len: int,
    steps: int,
    device: str = "cpu",
    dtype: str = "float32",
    toy: bool = False,
    dp_step: str | None = None,
) -> dict:
    from fedmoe.model.lora import adapter_parameters, expert_lora_modules
    from fedmoe.privacy.dp_sgd import SecureNoiseDPOptimizer, private_gradient
    from fedmoe.privacy.per_example import per_example_gradients_of

    torch.set_num_threads(2)
    on_gpu = torch.device(device).type == "cuda"
    dp_step = dp_step or ("optimizer" if on_gpu else "reference")
    shapes = TOY_MOE if toy else V2_LITE_MOE
    scheme = next((s for s in ("int8", "nf4") if s in mode), None)
    model, blocks = build_blocks(
        layers, mode != "transformers", scheme, device, DTYPES[dtype], shapes
    )
    for module in expert_lora_modules(model).values():
        module.dense = mode.startswith("dense")
    hidden = shapes["hidden_size"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seq_len, hidden, generator=g).to(device, DTYPES[dtype])
    x.requires_grad_()
    target = torch.randn(batch, seq_len, hidden, generator=g).to(device, DTYPES[dtype])
    params = adapter_parameters(blocks)
    optimizer = None
    if mode.endswith("DP") and dp_step == "optimizer":
        # Training's DP-SGD step (clip, sum, our noise, / batch) around a step that moves nothing.
        optimizer = SecureNoiseDPOptimizer(
            torch.optim.SGD(params.values(), lr=0.0),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch,
        )

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    def privatize(per_example: dict[str, torch.Tensor]) -> None:
        if optimizer is not None:
            for name, p in params.items():
                p.grad_sample = per_example[name]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return
        grads = private_gradient(
            per_example, clip=1.0, noise_multiplier=1.0, expected_batch_size=batch
        )
        for name, p in params.items():
            p.grad = grads[name]

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
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(steps + 1):
        model.zero_grad()
        x.grad = None
        sync()
        start = time.perf_counter()
        if mode.endswith("DP"):
            privatize(
                dense_per_example()
                if mode.startswith("dense")
                else per_example_gradients_of(blocks, batch, seq_len, lambda: losses(x, target))
            )
        else:
            losses(x, target).sum().backward()
        sync()
        times.append(time.perf_counter() - start)
    if on_gpu:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "step_s": statistics.median(times[1:]),  # the first step warms up allocators and caches
        "mem_mb": (peak - before) / 2**20,
        "weights_mb": sum(t.numel() * t.element_size() for t in blocks.state_dict().values())
        / 2**20,
        "implementation": model.config._experts_implementation,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "dtype": dtype,
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
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--toy", action="store_true", help="tiny blocks, for smoke tests")
    parser.add_argument(
        "--dp-step",
        choices=["reference", "optimizer"],
        help="DP modes: private_gradient (default on cpu) or training's DP optimizer",
    )
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        result = measure(
            args.mode, args.layers, args.batch, args.seq_len, args.steps,
            args.device, args.dtype, args.toy, args.dp_step,
        )  # fmt: skip
        print(json.dumps(result))
        return
    tokens = args.batch * args.seq_len
    results = {}
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--mode", mode]
        for flag in ("layers", "batch", "seq_len", "steps", "device", "dtype", "dp_step"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cmd += ["--toy"] if args.toy else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-3000:]}", flush=True)
            continue
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode}: {r['step_s']:.2f} s, {r['mem_mb']:.0f} MB", flush=True)

    where = next(iter(results.values()), {}).get("device", args.device)
    where = f"{where}, 2 CPU threads" if where == "cpu" else where
    print(
        f"\n{args.layers} {'toy' if args.toy else 'V2-Lite'} MoE block(s), batch {args.batch} x "
        f"{args.seq_len} tokens, {args.dtype}, {where}, forward + backward"
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

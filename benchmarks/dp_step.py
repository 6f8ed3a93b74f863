"""DP-SGD step vs a non-DP step on the same model: median time and peak memory, with ratios.

    python benchmarks/dp_step.py [--batch 16] [--seq-len 64] [--steps 10] [--rounds 5]

Each mode runs in fresh processes so that peak resident memory (ru_maxrss) is its own; the step's
memory is the peak minus the resident size after loading the model and data. The two modes take
turns, `--rounds` processes each, so that a change in the machine's load hits both alike; the time
is the median over all their steps, the memory the median over their processes.
The DP step is exact: per-example gradients of every adapter tensor from one batched backward
pass (privacy/per_example.py), clipping, noise (privacy/dp_sgd.py). The non-DP step is an ordinary
backward pass on the same batch; a third row runs it with the dense routed-expert form (every
expert for every token), to show where dense still wins (toy experts) or loses.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(mode: str, batch: int, seq_len: int, steps: int) -> dict:
    import torch

    from fedmoe.model.base import load_base
    from fedmoe.model.lora import adapter_parameters, attach_lora, expert_lora_modules
    from fedmoe.model.loss import per_sequence_loss
    from fedmoe.model.settings import LoraSettings
    from fedmoe.privacy.dp_sgd import private_gradient
    from fedmoe.privacy.per_example import per_example_gradients

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = attach_lora(load_base("embedded"), LoraSettings())
    model.train()
    for module in expert_lora_modules(model).values():
        module.dense = mode == "dense"
    params = adapter_parameters(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        if mode == "dp":
            grads = private_gradient(
                per_example_gradients(model, ids),
                clip=1.0,
                noise_multiplier=1.0,
                expected_batch_size=batch,
            )
            for name, p in params.items():
                p.grad = grads[name]
        else:
            model.zero_grad()
            per_sequence_loss(model, ids).mean().backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_s": times[2:], "step_mem_mb": (peak - rss_before) / 1024, "peak_mb": peak / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", choices=["dp", "plain", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.batch, args.seq_len, args.steps)))
        return
    runs: dict[str, list[dict]] = {"plain": [], "dp": [], "dense": []}
    for _ in range(args.rounds):
        for mode, mode_runs in runs.items():
            cmd = [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--batch",
                str(args.batch),
                "--seq-len",
                str(args.seq_len),
                "--steps",
                str(args.steps),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            mode_runs.append(json.loads(out.strip().splitlines()[-1]))
    results = {
        mode: {
            "median_s": statistics.median(t for r in mode_runs for t in r["step_s"]),
            "step_mem_mb": statistics.median(r["step_mem_mb"] for r in mode_runs),
            "peak_mb": statistics.median(r["peak_mb"] for r in mode_runs),
        }
        for mode, mode_runs in runs.items()
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"one step, embedded base + LoRA (all targets, r=16), batch {args.batch} x {args.seq_len} tokens, CPU, {args.rounds} rounds"
    )
    for col in (
        "mode",
        "median step s",
        "time ratio",
        "step memory MB",
        "memory ratio",
        "peak RSS MB",
    ):
        table.add_column(col, justify="left" if col == "mode" else "right")
    plain = results["plain"]
    for mode, label in (
        ("plain", "non-DP backward"),
        ("dp", "DP-SGD (per-example grads + clip + noise)"),
        ("dense", "non-DP backward, dense routed experts"),
    ):
        r = results[mode]
        table.add_row(
            label,
            f"{r['median_s']:.3f}",
            f"{r['median_s'] / plain['median_s']:.2f}x",
            f"{r['step_mem_mb']:.0f}",
            f"{r['step_mem_mb'] / max(plain['step_mem_mb'], 1e-9):.2f}x",
            f"{r['peak_mb']:.0f}",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()

"""Expert-weighted aggregation vs FedAvg on federations whose enterprises route to different
experts: each enterprise's held-out loss after the same rounds, with and without SecAgg+.

    python benchmarks/expert_aggregation.py [--federation demo|documents] [--seeds 0 1 2]
        [--rounds 3] [--local-steps 12] [--targets routed_experts]

1. Routing: the base model's expert load per enterprise and MoE layer (share of the top-k slots
   each routed expert receives over the enterprise's real, non-padding training tokens) and its
   total variation distance to the federation's mean load.
2. Real `fedmoe run`s (Flower's simulation engine) of the same federation and rounds, per seed
   (train.seed and lora.init_seed): `federation.aggregation` fedavg and expert-weighted, each
   without and with SecAgg+.
3. Each enterprise's mean per-record loss on its own held-out split under each run's last-round
   adapter (the same rounds for every run, not the run's best round) and under the base model.

Federations: `demo`, the bundled three domains (finance, clinical, manufacturing); `documents`,
seven enterprises of generated records, each holding one kind of document (three finance
templates, the clinical reports, three factory templates), whose routing differs more.

Target: expert-weighted at least as good as FedAvg on every enterprise and better on average.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from fedmoe_run import run_in
from privacy_utility import heldout_losses
from torch import nn

from fedmoe.model.base import load_base, load_tokenizer
from fedmoe.model.corpus import DEMO_DATA_DIR, DEMO_ENTERPRISES, generate, write_jsonl
from fedmoe.model.data import PADDING, find_split, load_blocks, load_records
from fedmoe.model.expert_lora import is_fused_experts
from fedmoe.model.lora import decoder_layers

RUNS = [
    ("fedavg", False),
    ("expert-weighted", False),
    ("fedavg", True),
    ("expert-weighted", True),
]


def log(text: str) -> None:
    print(f"[expert-aggregation] {text}", flush=True)


@torch.no_grad()
def expert_loads(
    enterprises: dict[str, Path], seq_len: int = 64
) -> dict[str, dict[int, np.ndarray]]:
    """Per enterprise, per MoE layer: the share of the top-k slots of its real training tokens
    (one record per row, padding left out) that each routed expert receives, under the base."""
    model, tokenizer = load_base("embedded"), load_tokenizer("embedded")
    layers, experts = decoder_layers(model), model.config.n_routed_experts
    moe = [
        i
        for i, layer in enumerate(layers)
        if is_fused_experts(getattr(layer.mlp, "experts", nn.Module()))
    ]
    chosen: dict[int, torch.Tensor] = {}  # per layer: the experts of a batch's tokens [tokens, k]

    def keep(i: int):
        return lambda _module, args, _output: chosen.__setitem__(i, args[1])

    handles = [layers[i].mlp.experts.register_forward_hook(keep(i)) for i in moe]
    loads = {}
    try:
        for name, data in enterprises.items():
            rows = load_records(find_split(data, "train"), tokenizer, seq_len)
            counts = {i: torch.zeros(experts) for i in moe}
            for batch in rows.split(64):
                model(input_ids=batch.clamp(min=0))
                real = (batch != PADDING).reshape(-1)
                for i in moe:
                    counts[i] += torch.bincount(chosen[i][real].reshape(-1), minlength=experts)
            loads[name] = {i: (c / c.sum()).numpy() for i, c in counts.items()}
    finally:
        for h in handles:
            h.remove()
    return loads


def routing_table(loads: dict[str, dict[int, np.ndarray]]) -> list[str]:
    names = list(loads)
    layers = list(loads[names[0]])
    experts = len(loads[names[0]][layers[0]])
    head = (
        "| layer | enterprise | " + " | ".join(f"e{e}" for e in range(experts)) + " | TVD to mean |"
    )
    lines = [head, "|---|---|" + "---:|" * (experts + 1)]
    for layer in layers:
        mean = np.mean([loads[n][layer] for n in names], axis=0)
        for n in names:
            load = loads[n][layer]
            tvd = 0.5 * np.abs(load - mean).sum()
            cells = " | ".join(f"{v:.2f}" for v in load)
            lines.append(f"| {layer} | {n} | {cells} | {tvd:.3f} |")
        cells = " | ".join(f"{v:.2f}" for v in mean)
        lines.append(f"| {layer} | federation mean | {cells} | - |")
    return lines


# One enterprise per kind of document (the generators' templates): routing differs more between
# kinds of document than between whole domains (the finance and factory templates split).
DOCUMENT_KINDS = {
    "risk-notes": ("finance", "Risk note"),
    "credit-reviews": ("finance", "Credit review"),
    "market-risk": ("finance", "Market risk"),
    "clinical": ("clinical", ""),
    "qc-logs": ("manufacturing", "QC log"),
    "shift-reports": ("manufacturing", "Shift report"),
    "nonconformance": ("manufacturing", "Nonconformance"),
}


def document_federation(root: Path, train: int = 400, heldout: int = 80) -> dict[str, Path]:
    """Seven enterprises of `train` + `heldout` generated records, each of one kind of document."""
    pools = {
        d: generate(d, 4 * (train + heldout), seed=300 + i) for i, d in enumerate(DEMO_ENTERPRISES)
    }
    enterprises = {}
    for name, (domain, prefix) in DOCUMENT_KINDS.items():
        pool = pools[domain]  # clinical: one template, no "text" (instruction and response)
        records = [r for r in pool if r["text"].startswith(prefix)] if prefix else pool
        records = records[: train + heldout]
        if len(records) < train + heldout:
            raise RuntimeError(f"{name}: only {len(records)} generated records")
        write_jsonl(records[:train], root / name / "train.jsonl")
        write_jsonl(records[train:], root / name / "heldout.jsonl")
        enterprises[name] = root / name
    return enterprises


def run_federation(workdir: Path, overrides: dict) -> tuple[Path, float]:
    """(last round's adapter checkpoint, seconds) of one `fedmoe run` on the simulation engine."""
    config, seconds, store = run_in(workdir, overrides)
    (run,) = store.runs()
    last = store.last_checkpoint(run.id)
    if run.status != "completed" or last is None or last.number != config.federation.rounds:
        raise SystemExit(f"run ended {run.status} ({run.error}) without its last round")
    return Path(last.checkpoint_path), seconds


def label_of(aggregation: str, secagg: bool) -> str:
    return aggregation + (" + SecAgg+" if secagg else "")


def cells(values: list[float], sign: str = "") -> str:
    return " | ".join(f"{v:{sign}.4f}" for v in values)


def run_all(args, enterprises: dict[str, Path], workdir: Path):
    """Held-out losses by (run label, seed) and run seconds by label, of every run."""
    losses: dict[tuple[str, int], dict[str, float]] = {}
    seconds: dict[str, list[float]] = {}
    total = len(RUNS) * len(args.seeds)
    for seed in args.seeds:
        for aggregation, secagg in RUNS:
            label = label_of(aggregation, secagg)
            log(f"run {len(losses) + 1}/{total}: {label}, seed {seed}")
            overrides = {
                "federation.rounds": args.rounds,
                "train.local_steps": args.local_steps,
                "lora.targets": args.targets,
                "train.seed": seed,
                "lora.init_seed": seed,
                "federation.aggregation": aggregation,
                "federation.secure_aggregation.enabled": secagg,
            }
            if args.federation != "demo":
                overrides["federation.enterprises"] = [
                    {"name": n, "data": str(d)} for n, d in enterprises.items()
                ]
            adapter, run_s = run_federation(workdir / f"run{len(losses)}", overrides)
            losses[label, seed] = heldout_losses(enterprises, adapter)
            seconds.setdefault(label, []).append(run_s)
            found = ", ".join(f"{n} {v:.4f}" for n, v in losses[label, seed].items())
            log(f"{label}, seed {seed}: {found} ({run_s:.0f} s)")
    return losses, seconds


def report(args, base: dict[str, float], losses, seconds) -> None:
    names = list(base)

    def mean_of(label: str) -> list[float]:
        return [statistics.fmean(losses[label, s][n] for s in args.seeds) for n in names]

    print(
        f"\nHeld-out loss per enterprise after {args.rounds} rounds x {args.local_steps} local "
        f"steps, LoRA on {', '.join(args.targets)}, mean over seeds {args.seeds}:\n"
    )
    print(f"| run | {' | '.join(names)} | mean | mean vs fedavg | run s (median) |")
    print("|---|" + "---:|" * (len(names) + 3))
    row = [base[n] for n in names]
    print(f"| base model | {cells(row)} | {statistics.fmean(row):.4f} | - | - |")
    for aggregation, secagg in RUNS:
        label = label_of(aggregation, secagg)
        row, fedavg = mean_of(label), mean_of(label_of("fedavg", secagg))
        vs = statistics.fmean(row) - statistics.fmean(fedavg)
        vs_cell = "-" if aggregation == "fedavg" else f"{vs:+.4f}"
        run_s = statistics.median(seconds[label])
        print(f"| {label} | {cells(row)} | {statistics.fmean(row):.4f} | {vs_cell} | {run_s:.0f} |")

    print("\nExpert-weighted minus FedAvg, per seed (negative: expert-weighted better):\n")
    print(f"| SecAgg+ | seed | {' | '.join(names)} | mean |")
    print("|---|---:|" + "---:|" * (len(names) + 1))
    verdicts = []
    for secagg in (False, True):
        weighted, fedavg = label_of("expert-weighted", secagg), label_of("fedavg", secagg)
        for seed in args.seeds:
            diff = [losses[weighted, seed][n] - losses[fedavg, seed][n] for n in names]
            on = "on" if secagg else "off"
            print(f"| {on} | {seed} | {cells(diff, sign='+')} | {statistics.fmean(diff):+.4f} |")
        diff = [w - f for w, f in zip(mean_of(weighted), mean_of(fedavg), strict=True)]
        worse = [n for n, d in zip(names, diff, strict=True) if d > 0]
        met = not worse and statistics.fmean(diff) < 0
        verdicts.append(
            f"target {'with' if secagg else 'without'} SecAgg+ (seed means): "
            f"{'met' if met else 'missed'}; mean {statistics.fmean(diff):+.4f}, "
            + (f"worse on {', '.join(worse)}" if worse else "at least as good on every enterprise")
        )
    print("\n" + "\n".join(verdicts))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--targets", nargs="+", default=["routed_experts"])
    parser.add_argument(
        "--federation",
        choices=["demo", "documents"],
        default="demo",
        help="demo: the bundled 3 domains; documents: 7 enterprises, one kind of document each",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.seed and lora.init_seed"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.federation == "demo":
            enterprises = {name: DEMO_DATA_DIR / name for name in DEMO_ENTERPRISES}
        else:
            enterprises = document_federation(workdir / "data")

        log("routing the enterprises' training records through the base model")
        print("\n".join(routing_table(expert_loads(enterprises))), flush=True)
        tokenizer = load_tokenizer("embedded")
        sequences = {
            n: load_blocks(find_split(d, "train"), tokenizer, 64).shape[0]
            for n, d in enterprises.items()
        }
        log(
            "FedAvg weights without SecAgg+ (training sequences of 64 tokens; under SecAgg+ "
            "every enterprise weighs 1): " + ", ".join(f"{n} {c}" for n, c in sequences.items())
        )
        log("held-out loss of the base model")
        base = heldout_losses(enterprises, None)
        losses, seconds = run_all(args, enterprises, workdir)
    report(args, base, losses, seconds)


if __name__ == "__main__":
    main()

"""Utility under privacy on the demo federation: held-out loss at epsilon in {1, 4, 8, inf} for
record-level DP (DP-SGD), enterprise-level DP (clipped, noised updates) and both.

    python benchmarks/privacy_utility.py [--rounds 3] [--local-steps 12] [--seeds 1]

Runs the federated algorithm in-process with the same code a Flower run uses (the enterprise
client's `fit`, including its privacy ledger and noise, and the coordinator's averaging), without
Flower's transport, so that the 10 settings take minutes, not an hour. Loss is each enterprise's
held-out loss of the final adapter, averaged over the three enterprises; the baseline is the
non-private run (epsilon = inf) measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch

from fedmoe.client.enterprise import EnterpriseNode, workspace
from fedmoe.client.settings import NodeSettings
from fedmoe.contract.round import LocalTrainSettings, RoundSpec
from fedmoe.coordinator.aggregation import apply_update, weighted_average
from fedmoe.model.base import load_base
from fedmoe.model.corpus import DEMO_DATA_DIR, DEMO_ENTERPRISES
from fedmoe.model.lora import attach_lora, get_adapter_vector, set_adapter_vector
from fedmoe.model.loss import evaluate_loss
from fedmoe.model.settings import LoraSettings
from fedmoe.privacy.settings import PrivacySettings

EPSILONS = (1.0, 4.0, 8.0)
MODES = ("record", "enterprise", "both")


def federated_run(
    privacy: dict, rounds: int, local_steps: int, seed: int, ledger_dir: Path
) -> float:
    lora, train = LoraSettings(), LocalTrainSettings(local_steps=local_steps, seed=seed)
    clients, spaces = [], []
    for name in DEMO_ENTERPRISES:
        node = NodeSettings(
            enterprise=name,
            data_dir=DEMO_DATA_DIR / name,
            ledger=ledger_dir / f"{name}-{seed}.sqlite",
        )
        spaces.append(workspace(node, lora, train.seq_len))
        clients.append(EnterpriseNode(node))
    ws = spaces[
        0
    ]  # the in-process clients share one cached model; each fit loads the global adapter first
    global_adapter = [get_adapter_vector(attach_lora(load_base("embedded"), lora))]
    run_uid = uuid.uuid4().hex
    for r in range(1, rounds + 1):
        config = RoundSpec(
            server_round=r, rounds=rounds, run_uid=run_uid, lora=lora, train=train,
            privacy=PrivacySettings.model_validate(privacy), base_fingerprint=ws.base_fingerprint,
            adapter_layout=ws.layout,
        ).to_config()  # fmt: skip
        results = [
            c.fit([a.copy() for a in global_adapter], config, secure_sum=None) for c in clients
        ]
        average = weighted_average([d for d, _, _ in results], [n for _, n, _ in results])
        global_adapter = apply_update(global_adapter, average)
    losses = []
    for space in spaces:
        set_adapter_vector(space.model, global_adapter[0])
        losses.append(
            evaluate_loss(space.model, space.heldout_blocks, train.eval_batch_size, space.device)
        )
    return statistics.fmean(losses)


def privacy_settings(mode: str, epsilon: float) -> dict:
    out = {}
    if mode in ("record", "both"):
        out["record"] = {"epsilon": epsilon}
    if mode in ("enterprise", "both"):
        out["enterprise"] = {"epsilon": epsilon}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        ledgers = Path(tmp)
        train = LocalTrainSettings()
        base = statistics.fmean(
            evaluate_loss(ws.model, ws.heldout_blocks, train.eval_batch_size, ws.device)
            for ws in (
                workspace(
                    NodeSettings(enterprise=n, data_dir=DEMO_DATA_DIR / n),
                    LoraSettings(),
                    train.seq_len,
                )
                for n in DEMO_ENTERPRISES
            )
        )

        def run(privacy: dict) -> float:
            return statistics.fmean(
                federated_run(privacy, args.rounds, args.local_steps, seed, ledgers)
                for seed in range(args.seeds)
            )

        started = time.perf_counter()
        baseline = run({})
        rows = [(mode, eps, run(privacy_settings(mode, eps))) for mode in MODES for eps in EPSILONS]
        seconds = time.perf_counter() - started

    print(
        f"demo federation: 3 enterprises, {args.rounds} rounds x {args.local_steps} local steps, delta 1e-5, clip 1.0, "
        f"{args.seeds} seed(s); held-out loss averaged over the enterprises ({seconds:.0f}s)"
    )
    print(
        f"base model (no fine-tune): {base:.4f}; non-private federated fine-tune (epsilon = inf): {baseline:.4f}\n"
    )
    print("| DP level | epsilon | held-out loss | vs non-private | fine-tune gain kept |")
    print("|---|---:|---:|---:|---:|")
    print(f"| none | inf | {baseline:.4f} | 1.00x | 100% |")
    for mode, eps, loss in rows:
        kept = (base - loss) / (base - baseline) * 100
        print(f"| {mode} | {eps:g} | {loss:.4f} | {loss / baseline:.2f}x | {kept:.0f}% |")


if __name__ == "__main__":
    main()

"""Round wall time vs the slowest client's local training (orchestration overhead), and fedmoe's
round time vs a plain Flower + peft FedAvg baseline on the same model, data and engine, all
measured in this one run.

    python benchmarks/federation_overhead.py [--rounds 3]

The baseline (benchmarks/flower_baseline) is the usual recipe: Flower's new Message API FedAvg,
peft LoRA on the attention projections, the model loaded inside each train/evaluate call.
fedmoe runs twice: with the same LoRA targets as the baseline, and with all targets (attention,
shared experts, routed experts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fedmoe_run import run_in
from rich.console import Console
from rich.table import Table

from fedmoe.coordinator.config import load_run_config
from fedmoe.coordinator.launcher import federation_config
from fedmoe.coordinator.service.superlink import FINISHED, SuperLink, submit_app
from fedmoe.model.base import EMBEDDED_BASE_DIR

BASELINE_APP = Path(__file__).parent / "flower_baseline"


def run_fedmoe(workdir: Path, rounds: int, targets: list[str]) -> dict:
    _, total, store = run_in(workdir, {"federation.rounds": rounds, "lora.targets": targets})
    rounds_rows = store.rounds(1)
    walls = [(r.ended_at - r.started_at).total_seconds() for r in rounds_rows]
    slowest = [
        max(p.duration_s for p in r.participations if p.duration_s is not None) for r in rounds_rows
    ]
    return {"total": total, "walls": walls, "slowest_client": slowest}


def run_baseline(workdir: Path, rounds: int) -> dict:
    config = load_run_config(None, {"federation.rounds": rounds})
    workdir.mkdir(parents=True, exist_ok=True)
    timings = workdir / "timings.json"
    values = {
        "model-path": str(EMBEDDED_BASE_DIR),
        "data-dirs": json.dumps([e.data for e in config.federation.enterprises]),
        "rounds": rounds,
        "local-steps": config.train.local_steps,
        "batch-size": config.train.batch_size,
        "seq-len": config.train.seq_len,
        "lr": config.train.lr,
        "timings-path": str(timings),
    }
    start = time.perf_counter()
    with SuperLink(workdir / "flower", simulation=True) as superlink:
        flower_run_id = submit_app(
            superlink.home, BASELINE_APP, values, "baseline", federation_config(config)
        )
        while (status := superlink.control().run_status(flower_run_id))[0] != FINISHED:
            time.sleep(1.0)
    total = time.perf_counter() - start
    if status[1] != "completed":
        raise SystemExit(f"baseline failed: {status}; see {workdir / 'flower'}")
    rows = json.loads(timings.read_text())
    return {"total": total, "walls": [r["end"] - r["start"] for r in rows], "slowest_client": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {
            "Flower + peft baseline (attention LoRA)": run_baseline(tmp / "baseline", args.rounds),
            "fedmoe, attention LoRA": run_fedmoe(tmp / "attn", args.rounds, ["attention"]),
            "fedmoe, all targets": run_fedmoe(
                tmp / "all", args.rounds, ["attention", "shared_experts", "routed_experts"]
            ),
        }
    base = results["Flower + peft baseline (attention LoRA)"]
    base_later = statistics.median(base["walls"][1:] or base["walls"])
    table = Table(
        title=f"round wall time, 3 simulated enterprises, {args.rounds} rounds (same machine, same run)"
    )
    for col in (
        "system",
        "round 1 s",
        "later rounds s (median)",
        "vs baseline",
        "slowest client s (later)",
        "round / slowest client",
        "total s",
    ):
        table.add_column(col, justify="left" if col == "system" else "right")
    for name, r in results.items():
        later = statistics.median(r["walls"][1:] or r["walls"])
        if r["slowest_client"]:
            slow = statistics.median(r["slowest_client"][1:] or r["slowest_client"])
            slow_cols = (f"{slow:.2f}", f"{later / slow:.2f}x")
        else:
            slow_cols = ("-", "-")
        table.add_row(
            name,
            f"{r['walls'][0]:.2f}",
            f"{later:.2f}",
            f"{later / base_later:.2f}x",
            *slow_cols,
            f"{r['total']:.1f}",
        )
    Console(width=180).print(table)


if __name__ == "__main__":
    main()

"""Round time on Flower's deployment engine against the slowest client's training time, on loopback,
with a per-phase breakdown, and the same run on the simulation engine beside it.

    python benchmarks/deployment.py [--rounds 5] [--agents 3 10] [--poll 0.2]

Real processes: `fedmoe coordinator` (SuperLink, fleet gateway, admin API) and one `fedmoe agent`
per enterprise, TLS and registered node keys, a run started through the admin API. Enterprises
beyond the demo's three reuse its data folders. Every round's numbers come from the run database
(round wall time, each node's training time) and from the ServerApp's log (wall time of the
train and evaluate messages as the coordinator sees them):

- fixed = round wall time - slowest client's training time (what orchestration costs);
- train message overhead = train message wall time - slowest training;
- server work = aggregation, checkpoint, server-side evaluation and the database commit;
- evaluate message = the federated evaluation round trip, node-side evaluation included: only
  the last round has one (a round's held-out losses ride on the next round's training replies,
  coordinator/round/strategy.py), so it is given as a mean over rounds 2..R, as is the fixed cost.
Medians over rounds 2..R unless said (round 1 also pays first-round setup); ratios are against
the slowest training time of the same run. A node's training time includes scoring the adapter
it received on its held-out split (80 records, a forward pass).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from loopback import Loopback  # noqa: E402

from fedmoe.coordinator.store.db import RunStore  # noqa: E402
from fedmoe.model.corpus import DEMO_DATA_DIR, DEMO_ENTERPRISES  # noqa: E402

TIMING = re.compile(r"\[fedmoe-timing\] (\w+) x(\d+) ([0-9.]+)s")


def round_stats(database_url: str, log_text: str) -> list[dict]:
    store = RunStore(database_url, migrate=False)
    (run,) = store.runs()[-1:]
    # Per round, in order: its train message, then its evaluate message if it has one (only the
    # last round's, in a public run in the clear: the others ride on the next round's training).
    trains, evaluates = [], []
    for kind, _, seconds in TIMING.findall(log_text):
        if kind == "train":
            trains.append(float(seconds))
            evaluates.append(0.0)
        elif kind == "evaluate" and evaluates:
            evaluates[-1] = float(seconds)
    rows = []
    for i, r in enumerate(store.rounds(run.id)):
        wall = (r.ended_at - r.started_at).total_seconds()
        slowest = max(p.duration_s for p in r.participations if p.duration_s is not None)
        train = trains[i] if i < len(trains) else float("nan")
        evaluate = evaluates[i] if i < len(evaluates) else 0.0
        rows.append(
            dict(
                wall=wall,
                slowest=slowest,
                train_overhead=train - slowest,
                evaluate=evaluate,
                server=wall - train - evaluate,
            )
        )
    store.close()
    return rows


def deployment(agents: int, rounds: int, poll: float, root: Path) -> list[dict]:
    names = [DEMO_ENTERPRISES[i % 3] + ("" if i < 3 else f"-{i // 3 + 1}") for i in range(agents)]
    loop = Loopback(root, poll_interval_s=poll)
    try:
        loop.start_coordinator()
        for i, name in enumerate(names):
            loop.add_agent(name, DEMO_DATA_DIR / DEMO_ENTERPRISES[i % 3])
            loop.register(name)
            loop.start_agent(name)
        loop.wait_online(names, timeout=120 + 15 * agents)  # agents import torch on 2 cores
        run = loop.start_run(overrides=(f"federation.rounds={rounds}",))
        loop.watch(run.id, timeout=3600)
        final = loop.wait_for(run.id, ("completed", "failed", "stopped", "budget_spent"))
        if final.status != "completed":
            raise RuntimeError(f"deployment run ended {final.status}: {final.error}")
        log = (root / "state" / "logs" / f"run-{run.id:04d}.log").read_text()
        return round_stats(loop.database_url, log)
    finally:
        loop.close()


def simulation(rounds: int, root: Path) -> list[dict]:
    db = f"sqlite:///{root / 'sim.db'}"
    cmd = [
        sys.executable,
        "-m",
        "fedmoe.cli",
        "run",
        "--set",
        f"federation.rounds={rounds}",
        "--set",
        f"database.url={db}",
    ]
    cmd += ["--set", f"output.dir={root / 'sim'}"]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        timeout=3600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"simulation failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    (log,) = (root / "sim" / "flower").glob("*/run.log")
    return round_stats(db, log.read_text())


def summarize(name: str, n: int, rows: list[dict]) -> str:
    """One table row: medians over rounds 2..R, and the fixed cost also as their mean (the last
    round's evaluate message, spread over the run's rounds)."""
    later = rows[1:] or rows

    def med(key: str) -> float:
        return statistics.median(r[key] for r in later)

    fixed = [r["wall"] - r["slowest"] for r in later]
    return (
        f"| {name} | {n} | {rows[0]['wall']:.1f} | {med('wall'):.2f} | {med('slowest'):.2f} "
        f"| {statistics.fmean(fixed):.2f} | {statistics.median(fixed):.2f} "
        f"| {med('wall') / med('slowest'):.2f}x | {med('train_overhead'):.2f} | {med('server'):.2f} "
        f"| {statistics.fmean(r['evaluate'] for r in later):.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--agents", type=int, nargs="+", default=[3, 10, 30])
    parser.add_argument("--poll", type=float, default=0.2, help="agents' poll_interval_s")
    parser.add_argument("--skip-simulation", action="store_true")
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory(prefix="fedmoe-bench-") as tmp:
        if not args.skip_simulation:
            started = time.monotonic()
            lines.append(summarize("simulation engine", 3, simulation(args.rounds, Path(tmp))))
            print(f"simulation done in {time.monotonic() - started:.0f}s", flush=True)
        for n in args.agents:
            started = time.monotonic()
            lines.append(
                summarize(
                    "deployment engine",
                    n,
                    deployment(n, args.rounds, args.poll, Path(tmp) / f"deploy-{n}"),
                )
            )
            print(
                f"deployment with {n} agents done in {time.monotonic() - started:.0f}s", flush=True
            )
    print()
    print(
        f"{args.rounds} rounds, demo federation, 12 local steps of 8 x 64 tokens, LoRA r=16 on every group; seconds"
    )
    print()
    print(
        "| engine | enterprises | round 1 | later rounds | slowest training | fixed, mean "
        "| fixed, median | round / slowest | train message overhead | server work "
        "| evaluate message, mean |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()

"""The one-run privacy audit (Steinke, Nasr and Jagielski 2023) on the demo federation: the
epsilon lower bound it certifies for a non-private run that memorises (several epochs) and for
record-level DP at epsilon 1, 4 and 8, and the time the audit adds.

    python benchmarks/privacy_audit.py [--canaries 100] [--rounds 3]

Each cell is a `fedmoe run` on Flower's simulation engine (three enterprises, each with its own
canaries, half of them trained on); the bound pools the three nodes' guesses. A DP run's bound
must stay at or below its epsilon; the non-private run's should be clearly above 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmoe.coordinator.store.db import RunStore  # noqa: E402


def run(root: Path, name: str, settings: list[str]) -> tuple[dict | None, float]:
    db = f"sqlite:///{root / 'runs.db'}"
    cmd = [sys.executable, "-m", "fedmoe.cli", "run", "--set", f"database.url={db}"]
    cmd += ["--set", f"output.dir={root / name}"]
    for setting in settings:
        cmd += ["--set", setting]
    started = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - started
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    store = RunStore(db, migrate=False)
    audit = store.runs()[-1].audit
    store.close()
    return audit, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--canaries", type=int, default=100, help="per enterprise")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    audit = [f"privacy.audit.canaries={args.canaries}", "privacy.audit.guess_fraction=0.4"]
    # The audit measures privacy, not utility: the small demo, its plans run as they are.
    rounds = f"federation.rounds={args.rounds}"
    audit.append("privacy.accept_noisy_plan=true")
    cells = [
        # ~10 epochs of each enterprise's data: memorises what it sees.
        ("no DP, ~10 epochs", [rounds, "train.local_steps=100", "train.lr=0.003"], None),
        *[
            (
                f"record-level DP, eps {eps:g}",
                [rounds, "train.local_steps=40", f"privacy.record.epsilon={eps}"],
                eps,
            )
            for eps in (1.0, 4.0, 8.0)
        ],
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmoe-audit-") as tmp:
        root = Path(tmp)
        for i, (name, settings, claimed) in enumerate(cells):
            result, seconds = run(root, f"cell{i}", [*settings, *audit])
            rows.append((name, claimed, result, seconds))
            print(f"{name}: done in {seconds:.0f}s", flush=True)
        _, plain = run(root, "plain", cells[-1][1])
        audited = rows[-1][3]
    print()
    print(
        f"demo federation, {args.rounds} rounds, {args.canaries} canaries per enterprise "
        f"({3 * args.canaries} in all, 40% of them guessed), 95% confidence"
    )
    print()
    print("| run | claimed eps | audited eps >= | right guesses | within claim | run s |")
    print("|---|---:|---:|---:|---|---:|")
    for name, claimed, result, seconds in rows:
        bound = result["epsilon_lower_bound"]
        within = "-" if claimed is None else ("yes" if bound <= claimed else "NO")
        print(
            f"| {name} | {'none' if claimed is None else f'{claimed:g}'} | {bound:.3f} | "
            f"{result['correct']} of {result['guesses']} | {within} | {seconds:.1f} |"
        )
    print()
    print(
        f"time the audit adds (DP eps 8 run): {audited:.1f}s with vs {plain:.1f}s without "
        f"({audited / plain:.2f}x)"
    )


if __name__ == "__main__":
    main()

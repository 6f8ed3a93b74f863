"""Utility under privacy: one real Flower run (`fedmoe run`, simulation engine) per cell, the
held-out loss of what each run hands out, and the share of the non-private gain it keeps.

    python benchmarks/privacy_utility.py [--levels record enterprise] [--epsilons ...]

- Record level (DP-SGD) on the large demo federation (3 enterprises x 28,500 training records),
  at epsilon 0.5, 1, 4, 8, with the private recipe of configs/private-demo.toml.
- Enterprise level (Gaussian and Laplace noise on each update, secure aggregation with noise
  shares) on the many-enterprise federation (36 non-IID enterprises), at epsilon 1, 4, 8, with
  the recipe of configs/private-many.toml.

Every cell has the same rounds and local steps as its non-private reference: the default run
config (`make run`'s recipe) on the same federation. A second reference runs the private recipe's
settings without noise. Held-out loss is the mean per-record loss of each enterprise's held-out
split under the run's result (its best round by the coordinator's public evaluation, or the base
model when no round beat it), averaged over the enterprises. Plans the planner refuses (noise
that swamps the update) run with `privacy.accept_noisy_plan = true` and are marked.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w
import torch

from fedmoe.coordinator.config import ConfigError, load_run_config
from fedmoe.coordinator.store.artifacts import adapter_of_run, load_adapted
from fedmoe.coordinator.store.db import RunStore
from fedmoe.model.base import load_tokenizer
from fedmoe.model.corpus import generated_enterprises, resolve_generated
from fedmoe.model.data import find_split, load_records
from fedmoe.model.loss import evaluate_loss

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "record": REPO / "configs" / "private-demo.toml",
    "enterprise": REPO / "configs" / "private-many.toml",
}
FEDERATION = {"record": "large", "enterprise": "many"}


def read_recipe(level: str) -> dict:
    import tomllib

    return tomllib.loads(RECIPES[level].read_text())


def cell_config(level: str, privacy: dict | None, recipe: bool, out: Path) -> dict:
    """The run config of one cell: the recipe's (or the default's) settings on the level's
    federation, with `privacy` as its privacy section."""
    config = read_recipe(level)
    if not recipe:  # the default run config, on the same federation and rounds
        federation = {k: config["federation"][k] for k in ("rounds", "enterprises")}
        config = {"federation": federation, "train": {}}
    config["train"] = {
        **config.get("train", {}),
        "local_steps": read_recipe(level)["train"]["local_steps"],
    }
    config["privacy"] = privacy or {}
    for e in config["federation"]["enterprises"]:
        e.pop("budget", None)
    config["database"] = {"url": f"sqlite:///{out / 'runs.db'}"}
    config["output"] = {"dir": str(out)}
    return config


def heldout_losses(enterprises: dict[str, Path], adapter: Path | None) -> dict[str, float]:
    """Each enterprise's mean per-record loss on its own held-out split (64 tokens a record) under
    `adapter` on the embedded base (None: the base model); `enterprises` maps names to data
    folders."""
    model, tokenizer = load_adapted("embedded", adapter), load_tokenizer("embedded")
    losses = {}
    for name, data in enterprises.items():
        rows = load_records(find_split(data, "heldout"), tokenizer, 64)
        losses[name] = evaluate_loss(model, rows, 64, torch.device("cpu"))
    return losses


def mean_heldout_loss(level: str, adapter: Path | None) -> float:
    """Mean over the level's enterprises of their held-out loss under `adapter` (None: base)."""
    federation = FEDERATION[level]
    enterprises = {
        name: resolve_generated(f"demo:{federation}/{name}")
        for name in generated_enterprises(federation)
    }
    return statistics.fmean(heldout_losses(enterprises, adapter).values())


def result_of_run(database: str) -> Path | None:
    """The adapter the run hands out (None: the base model)."""
    store = RunStore(database)
    (run,) = store.runs()
    if run.status != "completed":
        raise RuntimeError(f"the run ended {run.status}: {run.error}")
    return adapter_of_run(store, run.id)[0]


def run_cell(level: str, privacy: dict | None, recipe: bool) -> tuple[float, float, bool]:
    """(held-out loss, seconds, whether the planner refused the plan) of one Flower run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        config = cell_config(level, privacy, recipe, out)
        path = out / "run.toml"
        path.write_text(tomli_w.dumps(config))
        refused = False
        try:
            load_run_config(path)
        except ConfigError as err:
            if "swamp" not in str(err):
                raise
            refused = True
            config["privacy"]["accept_noisy_plan"] = True
            path.write_text(tomli_w.dumps(config))
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "fedmoe.cli", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"{level} {privacy}: {result.stdout[-2000:]}{result.stderr[-2000:]}")
        adapter = result_of_run(config["database"]["url"])
        return mean_heldout_loss(level, adapter), seconds, refused


def level_rows(level: str, epsilons: list[float]) -> list[str]:
    """The table rows of one level: base, the two non-private references, every DP cell."""
    federation = FEDERATION[level]
    base = mean_heldout_loss(level, None)
    reference, reference_s, _ = run_cell(level, None, recipe=False)
    rows = [f"| {federation} | base model, no fine-tune | - | {base:.4f} | 0% | - | |"]

    def row(label: str, eps: str, loss: float, seconds: float, note: str = "") -> None:
        kept = (base - loss) / (base - reference)
        rows.append(
            f"| {federation} | {label} | {eps} | {loss:.4f} | {kept:.0%} | {seconds:.0f} | {note} |"
        )
        print(rows[-1], flush=True)

    row("none (default run config)", "inf", reference, reference_s, "the reference")
    loss, seconds, _ = run_cell(level, None, recipe=True)
    row("none (the recipe's adapter and training, no DP)", "inf", loss, seconds)
    recipe_privacy = read_recipe(level)["privacy"][level]
    for mechanism in ["gaussian", "laplace"] if level == "enterprise" else [None]:
        for eps in epsilons:
            settings = {**recipe_privacy, "epsilon": float(eps)}
            if mechanism:
                settings["mechanism"] = mechanism
            loss, seconds, refused = run_cell(level, {level: settings}, recipe=True)
            label = level + (f" ({mechanism})" if mechanism else "")
            note = "planner refuses it (run with accept_noisy_plan)" if refused else ""
            row(label, f"{eps:g}", loss, seconds, note)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", nargs="+", default=["record", "enterprise"])
    parser.add_argument("--record-epsilons", nargs="+", type=float, default=[0.5, 1, 4, 8])
    parser.add_argument("--enterprise-epsilons", nargs="+", type=float, default=[1, 4, 8])
    args = parser.parse_args()
    rows = []
    for level in args.levels:
        epsilons = args.record_epsilons if level == "record" else args.enterprise_epsilons
        rows += level_rows(level, epsilons)
    print("\n| federation | DP | epsilon | held-out loss | gain kept | run s | note |")
    print("|---|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Utility under privacy, like with like: one real Flower run (`fedmoe run`, simulation engine) per
cell, the held-out loss of what each run hands out, and the share of the non-private gain it keeps.

    python benchmarks/privacy_utility.py [--levels record enterprise] [--record-epsilons ...]

- Record level (DP-SGD) on the large demo federation (3 enterprises x 28,500 training records),
  with the private recipe of configs/private-demo.toml.
- Enterprise level (Gaussian and Laplace noise on each update, secure aggregation with noise
  shares) on the many-enterprise federation (36 non-IID enterprises), with the recipe of
  configs/private-many.toml.

Every cell has the same rounds and local steps. Two references per level, and "gain kept" against
each: the same recipe with every noise sample zero (same Poisson sampling, same clipping, same
secure aggregation; benchmarks/noiseless/), and the best non-private run of the level's candidates
(the default run config, and the recipe's and the default's adapters at the recipe's expected
batch), the strict one. Held-out loss is the mean per-record loss of each enterprise's held-out
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
from dataclasses import dataclass, field
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


NOISELESS = Path(__file__).resolve().parent / "noiseless"


@dataclass(frozen=True)
class Cell:
    """One Flower run: the level's recipe (or the default run config) with these changes."""

    label: str
    recipe: bool
    privacy: dict | None = None
    noiseless: bool = False
    train: dict = field(default_factory=dict)
    lora: dict | None = None


def cell_config(level: str, cell: Cell, out: Path) -> dict:
    """The run config of one cell on the level's federation, rounds and local steps."""
    config = read_recipe(level)
    if not cell.recipe:  # the default run config, on the same federation and rounds
        federation = {k: config["federation"][k] for k in ("rounds", "enterprises")}
        config = {"federation": federation, "train": {}}
    config["train"] = {
        **config.get("train", {}),
        "local_steps": read_recipe(level)["train"]["local_steps"],
        **cell.train,
    }
    if cell.lora is not None:
        config["lora"] = cell.lora
    config["privacy"] = cell.privacy or {}
    for e in config["federation"]["enterprises"]:
        e.pop("budget", None)
    config["database"] = {"url": f"sqlite:///{out / 'runs.db'}"}
    config["output"] = {"dir": str(out)}
    return config


def expected_batch(level: str) -> int:
    """The record-level recipe's expected Poisson batch: sample rate x one enterprise's records."""
    recipe = read_recipe(level)
    rate = recipe["privacy"]["record"]["sample_rate"]
    data = resolve_generated(recipe["federation"]["enterprises"][0]["data"])
    with open(find_split(data, "train")) as records:
        return round(rate * sum(1 for _ in records))


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


def run_cell(level: str, cell: Cell) -> tuple[float, float, bool]:
    """(held-out loss, seconds, whether the planner refused the plan) of one Flower run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        config = cell_config(level, cell, out)
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
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        marks = out / "noiseless-marks"
        if cell.noiseless:  # every process of the run zeroes its noise samplers, and says so
            marks.mkdir()
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(NOISELESS), env.get("PYTHONPATH")])
            )
            env["FEDMOE_NOISELESS_MARKS"] = str(marks)
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "fedmoe.cli", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            env=env,
        )
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"{cell}: {result.stdout[-2000:]}{result.stderr[-2000:]}")
        if cell.noiseless and not any(marks.iterdir()):
            raise RuntimeError(f"{cell.label}: no node drew zeroed noise: the patch missed them")
        loss = mean_heldout_loss(level, result_of_run(config["database"]["url"]))
        print(
            f"# {level}: {cell.label} {cell.privacy or ''}: {loss:.4f} in {seconds:.0f} s",
            flush=True,
        )
        return loss, seconds, refused


def reference_cells(level: str) -> list[Cell]:
    """The level's non-private runs: the default run config and the candidates for the best
    non-private recipe in the same steps; and the recipe with its noise zeroed, per mechanism."""
    recipe = read_recipe(level)
    settings = recipe["privacy"][level]
    cells = [Cell("none (default run config)", recipe=False)]
    if level == "record":
        batch = {"batch_size": expected_batch(level)}
        cells += [
            Cell(f"none (default adapter, batch {batch['batch_size']})", False, train=batch),
            Cell(f"none (the recipe's adapter, batch {batch['batch_size']})", True, train=batch),
            Cell("record, noise 0 (same sampling and clipping)", True, {level: settings}, True),
        ]
    else:
        cells += [Cell("none (the recipe's adapter and training)", recipe=True)]
        for mechanism in ["gaussian", "laplace"]:
            noiseless = {level: {**settings, "mechanism": mechanism}}
            cells.append(Cell(f"enterprise ({mechanism}), noise 0", True, noiseless, True))
    return cells


def mechanism_of(level: str, cell: Cell) -> str | None:
    """The mechanism whose noiseless run a cell compares with (non-private cells: Gaussian's)."""
    if level == "record":
        return None
    return (cell.privacy or {}).get(level, {}).get("mechanism", "gaussian")


def level_rows(level: str, epsilons: list[float]) -> list[str]:
    """The table rows of one level: base, the non-private references, every DP cell."""
    federation = FEDERATION[level]
    base = mean_heldout_loss(level, None)
    rows = [f"| {federation} | base model, no fine-tune | - | {base:.4f} | 0% | 0% | - | |"]
    print(rows[-1], flush=True)
    references = [(cell, run_cell(level, cell)) for cell in reference_cells(level)]
    best = min(loss for _, (loss, _, _) in references)
    noise_zero = {
        mechanism_of(level, cell): loss for cell, (loss, _, _) in references if cell.noiseless
    }

    def row(cell: Cell, eps: str, result: tuple[float, float, bool]) -> None:
        loss, seconds, refused = result
        same = (base - loss) / (base - noise_zero[mechanism_of(level, cell)])
        strict = (base - loss) / (base - best)
        note = "planner refuses it (run with accept_noisy_plan)" if refused else ""
        note = "the best non-private run" if loss == best and eps == "inf" else note
        rows.append(
            f"| {federation} | {cell.label} | {eps} | {loss:.4f} | {same:.0%} | {strict:.0%} "
            f"| {seconds:.0f} | {note} |"
        )
        print(rows[-1], flush=True)

    for cell, result in references:
        row(cell, "inf", result)
    recipe_privacy = read_recipe(level)["privacy"][level]
    for mechanism in ["gaussian", "laplace"] if level == "enterprise" else [None]:
        for eps in epsilons:
            settings = {**recipe_privacy, "epsilon": float(eps)}
            if mechanism:
                settings["mechanism"] = mechanism
            cell = Cell(level + (f" ({mechanism})" if mechanism else ""), True, {level: settings})
            row(cell, f"{eps:g}", run_cell(level, cell))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", nargs="+", default=["record", "enterprise"])
    parser.add_argument("--record-epsilons", nargs="+", type=float, default=[1, 4, 8])
    parser.add_argument("--enterprise-epsilons", nargs="+", type=float, default=[1, 4, 8])
    args = parser.parse_args()
    rows = []
    for level in args.levels:
        epsilons = args.record_epsilons if level == "record" else args.enterprise_epsilons
        rows += level_rows(level, epsilons)
    print(
        "\n| federation | DP | epsilon | held-out loss | gain kept vs same recipe, noise 0 "
        "| gain kept vs best non-private | run s | note |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

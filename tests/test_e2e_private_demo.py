"""End to end, as the README has it: `make run`'s default run, then the private demo
(configs/private-demo.toml: record-level DP-SGD on the large demo federation under SecAgg+) in
the same folder. The demos keep their ledgers apart, and the private run learns: every
enterprise's held-out loss under the run's result is below the base model's."""

import shutil
from pathlib import Path

import pytest
import torch
from test_e2e import fedmoe

from fedmoe.coordinator.store.artifacts import adapter_of_run, load_adapted
from fedmoe.coordinator.store.db import RunStore
from fedmoe.coordinator.store.views import run_message
from fedmoe.model.base import load_tokenizer
from fedmoe.model.data import find_split, load_records
from fedmoe.model.loss import evaluate_loss

pytestmark = pytest.mark.e2e
REPO = Path(__file__).parents[1]


def test_make_run_then_the_private_demo_and_it_learns(tmp_path):
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "private-demo.toml", tmp_path / "configs")
    default = fedmoe("run", "--set", "federation.rounds=1", cwd=tmp_path)
    assert default.returncode == 0, default.stdout[-3000:] + default.stderr[-3000:]

    # One round of 4 steps instead of 3 x 12, to keep the suite fast; the recipe is the same.
    private = fedmoe(
        "run",
        "--config",
        "configs/private-demo.toml",
        "--set",
        "federation.rounds=1",
        "--set",
        "train.local_steps=4",
        cwd=tmp_path,
    )
    output = private.stdout + private.stderr
    assert private.returncode == 0, output[-4000:]
    assert "round 1/1 | clients 3/3" in output, output[-3000:]
    assert "refused" not in output and "WORSE" not in output
    assert "result: round" in output  # the run names what it hands out

    db = f"sqlite:///{tmp_path / 'runs' / 'fedmoe.db'}"
    store = RunStore(db)
    first, second = store.runs()
    assert first.status == second.status == "completed"
    assert (tmp_path / "runs" / "ledgers" / "finance.sqlite").is_file()
    assert (tmp_path / "runs" / "private-demo" / "ledgers" / "finance.sqlite").is_file()
    assert second.base_eval_loss is not None

    adapter, model_path = adapter_of_run(store, second.id)
    assert adapter is not None
    model, tokenizer = load_adapted(model_path, adapter), load_tokenizer(model_path)
    base = load_adapted(model_path, None)
    config = second.config
    for enterprise in config["federation"]["enterprises"]:
        heldout = find_split(Path(enterprise["data"]), "heldout")
        rows = load_records(heldout, tokenizer, 64)[:300]  # plenty to see the gain, and quick
        before = evaluate_loss(base, rows, 64, torch.device("cpu"))
        after = evaluate_loss(model, rows, 64, torch.device("cpu"))
        assert after < before, f"{enterprise['name']}: {before:.4f} -> {after:.4f}"
    assert run_message(second, store.rounds(second.id)).best_round > 0  # `fedmoe runs` shows it

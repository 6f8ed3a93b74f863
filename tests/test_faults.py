"""Faults that must cost no privacy budget, on real processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedmoe.client.ledger import PrivacyLedger
from fedmoe.coordinator.store.db import RunStore

pytestmark = pytest.mark.e2e


def test_unwritable_checkpoint_storage_fails_the_run_before_any_node_is_charged(tmp_path):
    """The run's checkpoint folder cannot be made (a file is in its place): round 1 fails
    before the budget handshake, so no simulated node's ledger holds a single charge."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run-0001").write_text("not a folder\n")
    settings = {
        "federation.rounds": 2,
        "privacy.enterprise.epsilon": 8.0,
        "privacy.accept_noisy_plan": "true",
        "database.url": f"sqlite:///{tmp_path / 'runs.db'}",
        "output.dir": "out",
    }
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    done = subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "run", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    (error,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert "round 1: cannot write to" in error and "no node was asked" in error
    (run,) = RunStore(settings["database.url"]).runs()
    assert run.status == "failed"
    for ledger in (tmp_path / "out" / "ledgers").glob("*.sqlite"):
        assert PrivacyLedger(ledger).entries() == [], ledger


def test_a_new_run_database_beside_another_ones_run_folders_is_refused_before_a_run_row(tmp_path):
    """Run numbers restart with a new database: its run 1 would write among the old run 1's."""
    old = tmp_path / "out" / "run-0001"
    old.mkdir(parents=True)
    (old / ".fedmoe-run").write_text("f" * 32 + "\n")
    database = f"sqlite:///{tmp_path / 'new.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "run", "--set", f"database.url={database}",
         "--set", "output.dir=out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert "output.dir:" in output and "holds runs of another run database (run-0001)" in output
    assert RunStore(database).runs() == []  # no run row
    assert sorted(p.name for p in old.iterdir()) == [".fedmoe-run"]  # the old run untouched

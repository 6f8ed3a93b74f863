"""One `fedmoe run` on the simulation engine, in a folder of its own: what the benchmarks that
compare whole runs share."""

from __future__ import annotations

import time
from pathlib import Path

from fedmoe.coordinator.config import RunConfig, load_run_config
from fedmoe.coordinator.launcher import launch
from fedmoe.coordinator.store.db import RunStore


def run_in(workdir: Path, overrides: dict) -> tuple[RunConfig, float, RunStore]:
    """(config, seconds, the run's database) of one run of the default config with `overrides`,
    its database and outputs in `workdir`; exits when the run fails."""
    db = f"sqlite:///{workdir / 'runs.db'}"
    config = load_run_config(None, {**overrides, "database.url": db, "output.dir": str(workdir)})
    started = time.perf_counter()
    if launch(config) != 0:
        raise SystemExit(f"fedmoe run failed (its log tail is printed above); see {workdir}")
    return config, time.perf_counter() - started, RunStore(db, migrate=False)

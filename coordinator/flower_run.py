"""What one Flower run of ours carries in its run config: which fedmoe run it is, the validated
run config itself, and where the run database is. The run config reaches the ServerApp through
Flower, never through a file on one host; simulated enterprises (simulation engine only) read
their data paths and budgets from here too."""

from __future__ import annotations

import json
from dataclasses import dataclass

from fedmoe.coordinator.config import RunConfig, parse_run_config

ENGINES = ("simulation", "deployment")


@dataclass(frozen=True)
class FlowerRun:
    run_id: int
    config: RunConfig
    database_url: str
    engine: str

    def to_run_config(self) -> dict:
        fed = self.config.federation
        simulated = [
            {
                "enterprise": e.name,
                "data_dir": e.data,
                "model_path": self.config.model.path,
                "threads": fed.threads_per_client,
                "budget": e.budget.model_dump(exclude_none=True),
                "ledger": e.ledger,
            }
            for e in fed.enterprises
            if self.engine == "simulation"
        ]
        return {
            "fedmoe-run-id": self.run_id,
            "run-config": self.config.model_dump_json(),
            "database-url": self.database_url,
            "engine": self.engine,
            "sim-enterprises": json.dumps(simulated),
        }

    @classmethod
    def from_run_config(cls, run_config: dict) -> FlowerRun:
        run_id = run_config.get("fedmoe-run-id")
        if not isinstance(run_id, int) or run_id < 1:
            raise ValueError(
                "this Flower run carries no fedmoe run: start runs with `fedmoe run` or `fedmoe admin start`"
            )
        engine = str(run_config.get("engine"))
        if engine not in ENGINES:
            raise ValueError(f"run config 'engine' must be one of {ENGINES}, got {engine!r}")
        config = parse_run_config(
            json.loads(str(run_config["run-config"])), "the Flower run's run config"
        )
        return cls(run_id, config, str(run_config["database-url"]), engine)

"""What one Flower run of ours carries in its run config: which fedmoe run it is and the validated
run config itself (the run database's URL travels apart: DATABASE_ENV). The run config reaches the ServerApp through
Flower, never through a file on one host; simulated enterprises (simulation engine only) read
their data paths, budgets and identity keys from here too."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedmoe.contract.keys import write_key_pair
from fedmoe.coordinator.config import RunConfig, parse_run_config

ENGINES = ("simulation", "deployment")
# Where the ServerApp finds the run database: in its environment, inherited from the SuperLink we
# start, never in the Flower run config, which every SuperNode receives (a PostgreSQL URL may
# carry a password).
DATABASE_ENV = "FEDMOE_DATABASE_URL"
# The ServerApp's last log line, so a log follower knows it has everything.
LOG_END = "fedmoe: the ServerApp's log ends here"


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
                "data": e.data,
                "heldout": e.heldout,
                "model_path": self.config.model.path,
                "threads": fed.threads_per_client,
                "budget": e.budget.model_dump(exclude_none=True),
                "ledger": e.ledger,
                "identity_key": str(_identity_key(e.ledger)),
            }
            for e in fed.enterprises
            if self.engine == "simulation"
        ]
        # The simulated federation pins its members' keys, as a real one would.
        pinned = [_public_line(node["identity_key"]) for node in simulated]
        for node in simulated:
            node["federation_keys"] = pinned
        return {
            "fedmoe-run-id": self.run_id,
            # Nodes receive this: the coordinator's [database] stays out (its URL is sent to
            # the ServerApp's process only, through DATABASE_ENV).
            "run-config": self.config.model_dump_json(exclude={"database"}),
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
        database_url = os.environ.get(DATABASE_ENV)
        if not database_url:
            raise ValueError(
                f"the ServerApp's process has no {DATABASE_ENV}: start runs with `fedmoe run` or "
                "`fedmoe admin start`, whose SuperLink passes it on"
            )
        return cls(run_id, config, database_url, engine)


def _identity_key(ledger: str) -> Path:
    """A simulated node's identity key: beside its ledger, made on first use."""
    key = Path(ledger).with_suffix(".key")
    if not key.exists():
        write_key_pair(key, key.with_suffix(".pub"))
    return key


def _public_line(private_key: str) -> str:
    return Path(private_key).with_suffix(".pub").read_text().strip()

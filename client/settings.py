"""Settings of one enterprise node: where its data and model live, its budget and ledger (the
enterprise's own, never the coordinator's)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedmoe.privacy.settings import NodeBudget


class NodeSettings(BaseModel):
    """Where one enterprise node finds its data and base model, and how much CPU it may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enterprise: str = Field(min_length=1, max_length=64)
    data_dir: Path
    model_path: str = "embedded"
    threads: int = Field(1, ge=1, le=512, description="torch CPU threads for this client")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    budget: NodeBudget = NodeBudget()
    ledger: Path | None = Field(
        None,
        description="the node's privacy ledger (SQLite); default ~/.fedmoe/ledger-<enterprise>.sqlite",
    )

    @property
    def ledger_path(self) -> Path:
        return (self.ledger or Path("~/.fedmoe") / f"ledger-{self.enterprise}.sqlite").expanduser()

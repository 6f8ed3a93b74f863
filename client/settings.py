"""Settings of one client: how it trains (sent by the coordinator each round) and where its node's
data and model live (the enterprise's own node config)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedmoe.privacy.settings import NodeBudget


class LocalTrainSettings(BaseModel):
    """Local training hyperparameters; the coordinator sends them in every round's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_steps: int = Field(12, ge=1, le=100_000, description="optimizer steps per client per round")
    batch_size: int = Field(8, ge=1, le=4096, description="sequences per step")
    seq_len: int = Field(64, ge=8, le=32_768, description="tokens per training sequence")
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient-norm clip for stability (not a privacy bound)")
    eval_batch_size: int = Field(16, ge=1, le=4096)
    seed: int = Field(0, ge=0)


class NodeSettings(BaseModel):
    """Where one enterprise node finds its data and base model, and how much CPU it may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enterprise: str = Field(min_length=1, max_length=64)
    data_dir: Path
    model_path: str = "embedded"
    threads: int = Field(1, ge=1, le=512, description="torch CPU threads for this client")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    budget: NodeBudget = NodeBudget()
    ledger: Path | None = Field(None, description="the node's privacy ledger (SQLite); default ~/.fedmoe/ledger-<enterprise>.sqlite")

    @property
    def ledger_path(self) -> Path:
        return (self.ledger or Path("~/.fedmoe") / f"ledger-{self.enterprise}.sqlite").expanduser()

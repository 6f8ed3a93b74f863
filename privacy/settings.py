"""Privacy settings of a run (the admin's `[privacy]` config section), validated once at the edge.

Two levels, each optional and independent:
- `record`: DP-SGD inside each enterprise. Protects each record (one row of an enterprise's data)
  in everything that enterprise releases during the run.
- `enterprise`: clipping and noise on each enterprise's adapter update before it leaves the node.
  Protects an enterprise's whole dataset.
Epsilon targets are per enterprise, for the whole run. A level left out gives no guarantee at that
level: the run says so, and nodes with a lifetime budget at that level refuse to train in it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedmoe.privacy.accounting import ACCOUNTANTS

Mechanism = Literal["gaussian", "laplace"]
MECHANISMS: tuple[str, ...] = ("gaussian", "laplace")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class RecordLevel(_Settings):
    """DP-SGD (Poisson sampling, per-example clipping, Gaussian noise) on each enterprise's records."""

    epsilon: float = Field(
        gt=0.0, le=1000.0, description="target epsilon per enterprise for the whole run"
    )
    delta: float = Field(
        1e-5,
        gt=0.0,
        lt=1.0,
        description="target delta; must also be < 1 / records of every enterprise",
    )
    clip: float = Field(1.0, gt=0.0, le=1e6, description="per-example gradient L2 bound")
    accountant: Literal["rdp", "prv", "pld"] = Field("rdp", description=f"one of {ACCOUNTANTS}")
    max_physical_batch_size: int = Field(
        16,
        ge=1,
        le=65_536,
        description="most sequences per forward/backward; larger logical batches are accumulated",
    )
    max_noise_multiplier: float = Field(
        20.0, gt=0.0, le=1e4, description="plans needing more noise than this are refused"
    )


class EnterpriseLevel(_Settings):
    """Clipping and noise on each enterprise's adapter update (DP-FedAvg, McMahan et al. 2018)."""

    epsilon: float = Field(
        gt=0.0, le=1000.0, description="target epsilon per enterprise for the whole run"
    )
    delta: float = Field(
        1e-5,
        gt=0.0,
        lt=1.0,
        description="target delta (Gaussian only; Laplace is pure epsilon-DP); must be < 1 / enterprises",
    )
    mechanism: Mechanism = Field(
        "gaussian", description="gaussian (L2 clip) or laplace (L1 clip, pure epsilon)"
    )
    clip: float = Field(
        1.0,
        gt=0.0,
        le=1e6,
        description="bound on each update's norm: L2 for gaussian, L1 for laplace",
    )
    max_noise_multiplier: float = Field(
        20.0, gt=0.0, le=1e4, description="plans needing more noise than this are refused"
    )


class PrivacySettings(_Settings):
    record: RecordLevel | None = None
    enterprise: EnterpriseLevel | None = None

    @property
    def enabled(self) -> bool:
        return self.record is not None or self.enterprise is not None


class NodeBudget(_Settings):
    """An enterprise's own lifetime budget for its data, across all runs (set on the node's side).
    A level without a budget is not limited; a level with one refuses rounds that give no
    guarantee at that level."""

    record_epsilon: float | None = Field(
        None, gt=0.0, le=1e4, description="lifetime record-level epsilon"
    )
    enterprise_epsilon: float | None = Field(
        None, gt=0.0, le=1e4, description="lifetime enterprise-level epsilon"
    )

    @property
    def limited(self) -> bool:
        return self.record_epsilon is not None or self.enterprise_epsilon is not None

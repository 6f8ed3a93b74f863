"""Privacy settings of a run (the admin's `[privacy]` config section), validated once at the edge.

Two levels, each optional and independent:
- `record`: DP-SGD inside each enterprise. Protects each record (one row of an enterprise's data)
  in everything that enterprise releases during the run.
- `enterprise`: clipping and noise on each enterprise's adapter update before it leaves the node.
  Protects an enterprise's whole dataset, under the neighbouring relation `adjacency` names:
  "zero-out" (the enterprise's update replaced by a zero update: sensitivity = clip) or
  "replace-one" (its data replaced by any other: sensitivity = 2 x clip).
Epsilon targets are per enterprise, for the whole run. A level left out gives no guarantee at that
level: the run says so, and nodes with a lifetime budget at that level refuse to train in it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedmoe.privacy.accounting import ACCOUNTANTS

Mechanism = Literal["gaussian", "laplace"]
MECHANISMS: tuple[str, ...] = ("gaussian", "laplace")
Adjacency = Literal["zero-out", "replace-one"]
SENSITIVITY = {"zero-out": 1.0, "replace-one": 2.0}  # in units of the clipping bound


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
    clip: float = Field(1.0, ge=1e-6, le=1e6, description="per-example gradient L2 bound")
    sample_rate: float = Field(
        0.02,
        gt=0.0,
        le=1.0,
        description="Poisson sampling rate of DP-SGD, the same for every enterprise: public, so "
        "the epsilon a node reports says nothing about how many records it holds (its expected "
        "batch is sample_rate x its records)",
    )
    accountant: Literal["rdp", "prv", "pld"] = Field("rdp", description=f"one of {ACCOUNTANTS}")
    min_records: int | None = Field(
        None,
        ge=1,
        le=10**12,
        description="a public lower bound on every enterprise's training records, declared by "
        "the admin: a deployed run's utility forecast rests on it, and a node holding fewer "
        "refuses the run (its refusal says no more than that)",
    )
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
    adjacency: Adjacency = Field(
        "zero-out",
        description="neighbouring datasets: zero-out (an enterprise's update vs a zero update; "
        "sensitivity clip) or replace-one (vs any other update; sensitivity 2 x clip)",
    )
    clip: float = Field(
        1.0,
        ge=1e-6,
        le=1e6,
        description="bound on each update's norm: L2 for gaussian, L1 for laplace",
    )
    max_noise_multiplier: float = Field(
        20.0, gt=0.0, le=1e4, description="plans needing more noise than this are refused"
    )


class AuditSettings(_Settings):
    """The one-run audit (privacy/audit.py): canaries in every enterprise's training data, an
    epsilon lower bound after the run."""

    canaries: int = Field(
        100, ge=10, le=100_000, description="canary records per enterprise, each in with p=1/2"
    )
    guess_fraction: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="share of an enterprise's canaries it guesses (half 'in', half 'out')",
    )
    confidence: float = Field(0.95, ge=0.5, lt=1.0, description="of the epsilon lower bound")


class PrivacySettings(_Settings):
    record: RecordLevel | None = None
    enterprise: EnterpriseLevel | None = None
    audit: AuditSettings | None = None
    accept_noisy_plan: bool = Field(
        False,
        description="run even when the planner forecasts noise that swamps the updates "
        "(privacy/forecast.py); the run is then refused only if it cannot meet its targets",
    )

    @property
    def enabled(self) -> bool:
        return self.record is not None or self.enterprise is not None


class NodeBudget(_Settings):
    """An enterprise's own privacy terms for its data, across all runs (set on the node's side,
    never by the coordinator): lifetime epsilon per level, its delta, and whether it trusts
    secure aggregation with noise shares. A level without a budget is not limited; a level with
    one refuses rounds that give no guarantee at that level."""

    record_epsilon: float | None = Field(
        None, gt=0.0, le=1e4, description="lifetime record-level epsilon"
    )
    enterprise_epsilon: float | None = Field(
        None, gt=0.0, le=1e4, description="lifetime enterprise-level epsilon"
    )
    delta: float = Field(
        1e-5,
        gt=0.0,
        lt=0.01,
        description="this node's delta: it refuses runs with a larger one, and its ledger "
        "charges epsilon at this delta, computed from the noise it adds itself",
    )
    full_noise: bool = Field(
        False,
        description="add the full noise even under secure aggregation (no noise shares): for a "
        "node that does not trust that SecAgg+ sums hold `threshold` honest nodes",
    )

    @property
    def limited(self) -> bool:
        return self.record_epsilon is not None or self.enterprise_epsilon is not None

"""Privacy plans: the noise a run needs to meet its epsilon targets, and what each round spends.

Pure functions of the settings and the run's shape (rounds, local steps, batch size, records),
computed before round 1 by the coordinator (to refuse infeasible runs) and by each node (to
calibrate its own noise and check its own budget). Both sides compute the same numbers.

Accounting assumes the worst case for every enterprise: it takes part in every round (no
amplification by the coordinator's client sampling, which a curious coordinator could bias), and
under secure aggregation only the fewest clients a round accepts contribute noise shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedmoe.privacy.accounting import gaussian_epsilon, noise_multiplier_for
from fedmoe.privacy.mechanisms import (
    UniformSource,
    add_noise,
    clip_l1,
    clip_l2,
    gaussian_epsilon_analytic,
    gaussian_noise,
    gaussian_sigma,
    laplace_share_noise,
    secure_uniform,
)
from fedmoe.privacy.settings import SENSITIVITY, EnterpriseLevel, PrivacySettings, RecordLevel
from fedmoe.support.words import plural

# Beyond these many DP-SGD steps an accountant's evaluation takes minutes (calibration runs ~15).
MAX_ACCOUNTED_STEPS = {"prv": 20_000, "pld": 1_000_000}


class InfeasiblePlan(ValueError):
    """The targets cannot be met with this run's shape; the message gives values that would work."""


@dataclass(frozen=True)
class RecordPlan:
    """DP-SGD in one enterprise: `steps_per_round` Poisson-sampled steps per round it takes part in."""

    noise_multiplier: float
    sample_rate: float
    expected_batch_size: float
    steps_per_round: int
    rounds: int
    delta: float
    accountant: str

    def epsilon_after(self, participations: int, delta: float | None = None) -> float:
        """Epsilon after this many rounds, at `delta` (default: the plan's)."""
        return gaussian_epsilon(
            self.noise_multiplier,
            self.sample_rate,
            participations * self.steps_per_round,
            self.delta if delta is None else delta,
            self.accountant,
        )


@dataclass(frozen=True)
class EnterprisePlan:
    """Noise on each enterprise's clipped update; `noise_multiplier` is the noise std (Gaussian) or
    scale (Laplace) of one round's release in units of the clipping bound."""

    mechanism: str
    clip: float
    noise_multiplier: float
    rounds: int
    delta: float  # 0 for Laplace (pure epsilon-DP)
    sensitivity: float = 1.0  # in units of clip: 1 under zero-out adjacency, 2 under replace-one

    @property
    def noise_scale(self) -> float:
        return self.noise_multiplier * self.clip

    def epsilon_after(self, participations: int, delta: float | None = None) -> float:
        """Epsilon after this many releases, at `delta` (default: the plan's; Laplace ignores it)."""
        if participations == 0:
            return 0.0
        # Noise in units of the sensitivity: what one release's epsilon depends on.
        relative = self.noise_multiplier / self.sensitivity
        if self.mechanism == "laplace":
            return participations / relative  # basic composition of epsilon = sensitivity / scale
        # k Gaussian releases compose exactly to one with sensitivity sqrt(k) (Balle & Wang's analytic bound).
        return gaussian_epsilon_analytic(
            relative, self.delta if delta is None else delta, math.sqrt(participations)
        )


def plan_record_level(
    settings: RecordLevel, records: int, steps_per_round: int, rounds: int
) -> RecordPlan:
    """Calibrate DP-SGD noise so `rounds` rounds of `steps_per_round` steps spend at most the
    target. The noise depends only on public values (the sample rate, steps, rounds), so neither
    it nor any message below names `records`, which a node sends the coordinator when it refuses."""
    if not settings.delta < 1.0 / records:
        raise InfeasiblePlan(
            f"privacy.record.delta={settings.delta:g} is not below 1/records of this enterprise's data"
        )
    steps = rounds * steps_per_round
    if steps > (limit := MAX_ACCOUNTED_STEPS.get(settings.accountant, steps)):
        raise InfeasiblePlan(
            f"privacy.record.accountant={settings.accountant!r} takes minutes per evaluation beyond {limit:,} DP-SGD "
            f'steps, and this plan has {steps:,} (federation.rounds x train.local_steps): use accountant = "rdp"'
        )
    q = settings.sample_rate
    cap = settings.max_noise_multiplier

    def epsilon(noise: float, rounds_: int) -> float:
        return gaussian_epsilon(
            noise, q, rounds_ * steps_per_round, settings.delta, settings.accountant
        )

    best = epsilon(cap, rounds)
    if best > settings.epsilon:
        # The most rounds the target allows at the cap: epsilon grows with rounds, so bisect.
        max_rounds, too_many = 0, rounds
        while too_many - max_rounds > 1:
            mid = (max_rounds + too_many) // 2
            max_rounds, too_many = (
                (mid, too_many) if epsilon(cap, mid) <= settings.epsilon else (max_rounds, mid)
            )
        raise InfeasiblePlan(
            f"privacy.record.epsilon={settings.epsilon:g} over {plural(rounds, 'round')} x {plural(steps_per_round, 'step')} at "
            f"privacy.record.sample_rate={q:g} needs a noise multiplier above max_noise_multiplier={cap:g}. "
            f"This plan works with privacy.record.epsilon >= {math.ceil(best * 100) / 100:g}"
            + (f", or with federation.rounds <= {max_rounds}" if max_rounds else "")
            + ", or with fewer train.local_steps or a smaller privacy.record.sample_rate"
        )
    noise = noise_multiplier_for(
        settings.epsilon, q, rounds * steps_per_round, settings.delta, settings.accountant
    )
    return RecordPlan(
        noise, q, q * records, steps_per_round, rounds, settings.delta, settings.accountant
    )


def plan_enterprise_level(settings: EnterpriseLevel, rounds: int) -> EnterprisePlan:
    """Calibrate the update noise so `rounds` releases spend at most the target."""
    cap = settings.max_noise_multiplier
    sensitivity = SENSITIVITY[settings.adjacency]
    if settings.mechanism == "laplace":
        # each round spends epsilon / rounds: scale = sensitivity x clip x rounds / epsilon
        noise = sensitivity * rounds / settings.epsilon
        if noise > cap:
            most = math.floor(settings.epsilon * cap / sensitivity)
            raise InfeasiblePlan(
                f"privacy.enterprise.epsilon={settings.epsilon:g} over {plural(rounds, 'round')} needs Laplace scale {noise:.3g} x clip, "
                f"above max_noise_multiplier={cap:g}. This plan works with privacy.enterprise.epsilon >= "
                f"{sensitivity * rounds / cap:.3g}"
                + (f", or with federation.rounds <= {most}" if most >= 1 else "")
            )
        return EnterprisePlan("laplace", settings.clip, noise, rounds, 0.0, sensitivity)
    single = gaussian_sigma(settings.epsilon, settings.delta) * sensitivity
    noise = single * math.sqrt(rounds)
    if noise > cap:
        floor = gaussian_epsilon_analytic(cap / sensitivity, settings.delta, math.sqrt(rounds))
        raise InfeasiblePlan(
            f"privacy.enterprise.epsilon={settings.epsilon:g} over {plural(rounds, 'round')} needs noise multiplier {noise:.3g}, "
            f"above max_noise_multiplier={cap:g}. This plan works with privacy.enterprise.epsilon >= "
            f"{math.ceil(floor * 100) / 100:g}"
            + (
                f", or with federation.rounds <= {math.floor((cap / single) ** 2)}"
                if cap >= single
                else ""
            )
        )
    return EnterprisePlan("gaussian", settings.clip, noise, rounds, settings.delta, sensitivity)


def privatize_update(
    update: list[np.ndarray],
    plan: EnterprisePlan,
    shares: int = 1,
    uniform: UniformSource = secure_uniform,
) -> tuple[list[np.ndarray], float]:
    """Clip an enterprise's update (L2 for Gaussian, L1 for Laplace) and add its noise.

    `shares` is how many clients' noise ends up in the sum the coordinator sees: 1 without secure
    aggregation (every update carries the full noise), and the fewest contributors a round
    accepts with it (each adds one share; the shares of any `shares` clients sum to the full noise,
    more clients only add more). Returns (noised update, norm before clipping)."""
    if shares < 1:
        raise ValueError(f"shares must be >= 1, got {shares}")
    n = sum(t.size for t in update)
    if plan.mechanism == "laplace":
        clipped, norm = clip_l1(update, plan.clip)
        noise = laplace_share_noise(n, plan.noise_scale, shares, uniform)
    else:
        clipped, norm = clip_l2(update, plan.clip)
        noise = gaussian_noise(n, plan.noise_scale / math.sqrt(shares), uniform)
    return add_noise(clipped, lambda _: noise), norm


@dataclass(frozen=True)
class PrivacyPlan:
    """Both levels of one run as seen by one enterprise; a level that is off gives no guarantee."""

    record: RecordPlan | None
    enterprise: EnterprisePlan | None

    def epsilon_after(
        self, level: str, participations: int, delta: float | None = None
    ) -> tuple[float, float]:
        """(epsilon, delta) of the run at `level` after this many releases, at `delta` (default:
        the plan's; infinite epsilon when the level is off, delta 0 for Laplace)."""
        plan = {"record": self.record, "enterprise": self.enterprise}[level]
        if plan is None:
            return math.inf, 0.0
        if plan.delta == 0.0:
            return plan.epsilon_after(participations), 0.0
        at = plan.delta if delta is None else delta
        return plan.epsilon_after(participations, at), at


def plan_run(
    settings: PrivacySettings, records: int, steps_per_round: int, rounds: int
) -> PrivacyPlan:
    """The privacy plan of a run for an enterprise with `records` records; raises InfeasiblePlan."""
    return PrivacyPlan(
        record=plan_record_level(settings.record, records, steps_per_round, rounds)
        if settings.record
        else None,
        enterprise=plan_enterprise_level(settings.enterprise, rounds)
        if settings.enterprise
        else None,
    )

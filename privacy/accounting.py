"""Privacy accounting: epsilon spent by repeated (subsampled) mechanisms, and the noise needed
for a target epsilon. Pure functions; Opacus and dp-accounting do the numerics.

- Poisson-subsampled Gaussian (DP-SGD steps, client-level rounds): RDP (Opacus), PRV (Opacus),
  PLD (dp-accounting, as a cross-check).
- Laplace: pure epsilon-DP, basic composition (k releases at epsilon each spend k * epsilon).
Opacus's `gdp` accountant under-reports for small noise and is deliberately not offered.
"""

from __future__ import annotations

import warnings
from typing import Literal

Accountant = Literal["rdp", "prv", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "pld")
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def gaussian_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "rdp",
) -> float:
    """Epsilon after `steps` Poisson-subsampled Gaussian releases with std = noise_multiplier * sensitivity."""
    _check(noise_multiplier, sample_rate, steps, delta)
    if steps == 0:
        return 0.0
    if accountant == "rdp":
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        rdp = compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=RDP_ORDERS
        )
        with (
            warnings.catch_warnings()
        ):  # "optimal order is the largest alpha": the bound is still valid, only loose
            warnings.simplefilter("ignore", UserWarning)
            eps, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
        return float(eps)
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
        acc.history = [(noise_multiplier, sample_rate, steps)]
        return float(acc.get_epsilon(delta=delta))
    if accountant == "pld":
        import dp_accounting

        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
            ),
            steps,
        )
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
        return float(acc.compose(event).get_epsilon(delta))
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def noise_multiplier_for(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "rdp",
    tolerance: float = 1e-3,
) -> float:
    """Smallest noise multiplier whose epsilon after `steps` is at most `target_epsilon`."""
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    lo, hi = 0.0, 1.0
    while gaussian_epsilon(hi, sample_rate, steps, delta, accountant) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(
                f"no noise multiplier reaches epsilon={target_epsilon} with delta={delta}"
            )
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if gaussian_epsilon(mid, sample_rate, steps, delta, accountant) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def laplace_epsilon(epsilon_per_release: float, releases: int) -> float:
    """Basic composition of pure epsilon-DP releases."""
    if not epsilon_per_release > 0:
        raise ValueError(f"epsilon per release must be > 0, got {epsilon_per_release}")
    if releases < 0:
        raise ValueError(f"releases must be >= 0, got {releases}")
    return epsilon_per_release * releases

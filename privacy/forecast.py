"""Will a private run still learn? A forecast of the noise in what each level releases, against
the largest signal it can carry, from public numbers only (the plan's noise, the number of
trainable parameters, the expected batch, the enterprises), before round 1.

Record level, one DP-SGD step: the mean of B clipped per-example gradients (norm <= clip) plus
Gaussian noise of std sigma x clip / B in each of d coordinates, so

    noise norm / largest signal = sigma x sqrt(d) / B.

Enterprise level, one round: the average of n clipped updates (norm <= clip) plus the noise of
the sum: std s (sigma x clip for Gaussian, sqrt(2) x scale for Laplace) per coordinate, times
sqrt(n / k) when k noise shares make up the full noise (secure aggregation; k = 1 without it,
every update then carries it all), over n:

    noise norm / largest signal = s x sqrt(n / k) x sqrt(d) / (n x signal).

The signal is the best case (every example, or every enterprise, pulling the same way): clip for
an L2 clip; for Laplace's L1 clip, clip / sqrt(d), the L2 norm of a dense update of L1 norm clip
(an adapter update is dense; only a one-coordinate update would keep L2 norm clip). Measured on
the demo federations, a ratio above MAX_NOISE_TO_SIGNAL destroys the adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedmoe.privacy.plan import EnterprisePlan, RecordPlan

# benchmarks/README.md: record-level DP-SGD learned at 0.21-0.63, the old demo's 39 did not;
# enterprise level kept a little of its gain at 1.47 with a server step of 0.25-0.3.
MAX_NOISE_TO_SIGNAL = 2.0


@dataclass(frozen=True)
class Forecast:
    level: str
    noise_to_signal: float
    noise_norm: float  # expected norm of the noise in one release (step or round)
    signal_bound: float  # the largest norm of what the noise is added to
    enterprise: str | None = None  # record level: whose expected batch

    @property
    def hopeless(self) -> bool:
        return self.noise_to_signal > MAX_NOISE_TO_SIGNAL

    def describe(self) -> str:
        what = "DP-SGD step" if self.level == "record" else "round's average update"
        whose = f" ({self.enterprise})" if self.enterprise else ""
        return (
            f"{self.level} level{whose}: noise {self.noise_to_signal:.3g}x the largest signal of a "
            f"{what} (noise norm {self.noise_norm:.3g} vs {self.signal_bound:.3g})"
        )


def record_forecast(plan: RecordPlan, clip: float, params: int) -> Forecast:
    batch = max(plan.expected_batch_size, 1.0)
    noise = plan.noise_multiplier * clip * math.sqrt(params) / batch
    return Forecast("record", noise / clip, noise, clip)


def enterprise_noise_std(plan: EnterprisePlan) -> float:
    """Per-coordinate std of one round's full noise."""
    return plan.noise_scale * (math.sqrt(2.0) if plan.mechanism == "laplace" else 1.0)


def enterprise_forecast(
    plan: EnterprisePlan, params: int, enterprises: int, noise_shares: int, clip_share: float = 1.0
) -> Forecast:
    """`clip_share`: the share of the clip the update may use (expert-weighted aggregation gives
    the rest to the routing counts)."""
    per_coordinate = enterprise_noise_std(plan) * math.sqrt(enterprises / noise_shares)
    noise = per_coordinate * math.sqrt(params) / enterprises
    clip = plan.clip * clip_share
    signal = clip / math.sqrt(params) if plan.mechanism == "laplace" else clip
    return Forecast("enterprise", noise / signal, noise, signal)


def record_fixes(
    forecast: Forecast, plan: RecordPlan, params: int, records: int, declared: bool = False
) -> list[str]:
    """Changes that would each bring a record-level forecast under the limit; `declared`: the
    records are a deployment's public bound (privacy.record.min_records)."""
    factor = forecast.noise_to_signal / MAX_NOISE_TO_SIGNAL
    # The noise falls with the expected batch q*N, which the forecast takes as at least 1.
    needed = math.ceil(max(plan.expected_batch_size, 1.0) * factor / plan.sample_rate)
    more = (
        f"privacy.record.min_records >= {needed:,} (now {records:,}), if every enterprise holds "
        "that many"
        if declared
        else f"more records per enterprise: >= {needed:,} (now {records:,})"
    )
    return [
        f"train fewer adapter parameters: <= {int(params / factor**2):,} (now {params:,}; "
        "lora.r, lora.targets, lora.top_layers_fraction)",
        f"{more}, for a larger expected batch",
        "a larger privacy.record.sample_rate (a larger batch; the noise grows more slowly)",
        "a larger privacy.record.epsilon",
    ]


def enterprise_fixes(
    forecast: Forecast,
    plan: EnterprisePlan,
    params: int,
    enterprises: int,
    secure_aggregation: bool,
    secagg_shares: int,
) -> list[str]:
    """Changes that would each bring an enterprise-level forecast under the limit; secure
    aggregation (`secagg_shares` noise shares) is offered alone only if it is enough alone."""
    factor = forecast.noise_to_signal / MAX_NOISE_TO_SIGNAL
    # The ratio grows with sqrt(d) (L2 clip), with d under Laplace's L1 clip.
    fewer = params / (factor if plan.mechanism == "laplace" else factor**2)
    fixes = [
        f"train fewer adapter parameters: <= {int(fewer):,} (now {params:,}; "
        "lora.r, lora.targets, lora.top_layers_fraction)",
    ]
    with_secagg = forecast.noise_to_signal / math.sqrt(secagg_shares)
    if not secure_aggregation and with_secagg <= MAX_NOISE_TO_SIGNAL:
        fixes.append(
            "federation.secure_aggregation.enabled = true: each node then adds only a share of "
            f"the noise, and the average carries it once instead of n times ({with_secagg:.3g}x)"
        )
    more = math.ceil(enterprises * (factor if secure_aggregation else factor**2))
    fixes += [
        f"more enterprises: >= {more:,} (now {enterprises})",
        "a larger privacy.enterprise.epsilon",
    ]
    return fixes

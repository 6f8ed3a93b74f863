"""Privacy plans: calibration meets the targets, infeasible plans are refused with numbers that
work, distributed noise shares sum to the configured noise, clipped updates match a reference."""

import math

import numpy as np
import pytest
from scipy import stats

from fedmoe.privacy.accounting import gaussian_epsilon
from fedmoe.privacy.mechanisms import (
    clip_l2,
    gaussian_epsilon_analytic,
    gaussian_noise,
    gaussian_sigma,
    l1_norm,
    l2_norm,
    laplace_share_noise,
    seeded_uniform,
)
from fedmoe.privacy.plan import (
    EnterprisePlan,
    InfeasiblePlan,
    plan_enterprise_level,
    plan_record_level,
    plan_run,
    privatize_update,
)
from fedmoe.privacy.settings import EnterpriseLevel, PrivacySettings, RecordLevel


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_record_level_plan_spends_at_most_the_target_over_the_planned_rounds(accountant, epsilon):
    plan = plan_record_level(
        RecordLevel(epsilon=epsilon, accountant=accountant, sample_rate=0.02),
        records=400,
        steps_per_round=12,
        rounds=3,
    )
    assert plan.sample_rate == 0.02 and plan.expected_batch_size == 8
    assert plan.epsilon_after(3) <= epsilon
    assert plan.epsilon_after(3) > 0.97 * epsilon  # tight: not over-noised
    assert plan.epsilon_after(1) < plan.epsilon_after(2) < plan.epsilon_after(3)
    assert plan.epsilon_after(3) == pytest.approx(
        gaussian_epsilon(plan.noise_multiplier, 0.02, 36, 1e-5, accountant)
    )


def test_enterprise_gaussian_plan_is_exact_composition_and_matches_pld():
    plan = plan_enterprise_level(EnterpriseLevel(epsilon=4.0, delta=1e-5), rounds=5)
    assert plan.noise_multiplier == pytest.approx(gaussian_sigma(4.0, 1e-5) * math.sqrt(5))
    assert plan.epsilon_after(5) == pytest.approx(4.0, abs=1e-9)
    # Without subsampling (q = 1) the PLD accountant is exact too; RDP is an upper bound.
    assert plan.epsilon_after(5) == pytest.approx(
        gaussian_epsilon(plan.noise_multiplier, 1.0, 5, 1e-5, "pld"), abs=0.02
    )
    assert gaussian_epsilon(plan.noise_multiplier, 1.0, 5, 1e-5, "rdp") >= plan.epsilon_after(5)
    assert gaussian_epsilon_analytic(gaussian_sigma(1.0, 1e-5), 1e-5) == pytest.approx(
        1.0, abs=1e-9
    )


def test_enterprise_laplace_plan_is_pure_epsilon_with_basic_composition():
    plan = plan_enterprise_level(
        EnterpriseLevel(epsilon=2.0, mechanism="laplace", clip=0.5), rounds=4
    )
    assert plan.delta == 0.0 and plan.noise_scale == pytest.approx(
        0.5 * 4 / 2.0
    )  # b = clip / (epsilon / rounds)
    assert [plan.epsilon_after(k) for k in range(5)] == pytest.approx([0, 0.5, 1.0, 1.5, 2.0])


def test_a_level_that_is_off_gives_no_guarantee():
    plan = plan_run(
        PrivacySettings(enterprise=EnterpriseLevel(epsilon=1.0)),
        records=100,
        steps_per_round=2,
        rounds=2,
    )
    assert plan.epsilon_after("record", 1) == (math.inf, 0.0)
    assert plan.epsilon_after("enterprise", 2)[0] == pytest.approx(1.0)


def test_infeasible_record_plan_is_refused_with_numbers_that_work():
    settings = RecordLevel(epsilon=0.05, max_noise_multiplier=5.0)
    with pytest.raises(InfeasiblePlan, match=r"privacy\.record\.epsilon >= ([0-9.]+)") as err:
        plan_record_level(settings, records=400, steps_per_round=12, rounds=10)
    suggested = float(err.value.args[0].split("privacy.record.epsilon >= ")[1].split(",")[0])
    plan = plan_record_level(
        settings.model_copy(update={"epsilon": suggested}),
        records=400,
        steps_per_round=12,
        rounds=10,
    )
    assert plan.noise_multiplier <= 5.0


def test_infeasible_enterprise_plan_suggests_epsilon_and_rounds_that_work():
    settings = EnterpriseLevel(epsilon=1.0, max_noise_multiplier=10.0)
    with pytest.raises(InfeasiblePlan) as err:
        plan_enterprise_level(settings, rounds=50)
    message = err.value.args[0]
    rounds = int(message.split("federation.rounds <= ")[1])
    epsilon = float(message.split("privacy.enterprise.epsilon >= ")[1].split(",")[0])
    assert plan_enterprise_level(settings, rounds=rounds).noise_multiplier <= 10.0
    with pytest.raises(InfeasiblePlan):
        plan_enterprise_level(settings, rounds=rounds + 1)
    assert (
        plan_enterprise_level(
            settings.model_copy(update={"epsilon": epsilon}), rounds=50
        ).noise_multiplier
        <= 10.0
    )


def test_delta_must_be_below_one_over_records_without_naming_the_count():
    with pytest.raises(
        InfeasiblePlan, match=r"privacy\.record\.delta=0\.01 is not below 1/records"
    ) as err:
        plan_record_level(
            RecordLevel(epsilon=1.0, delta=0.01), records=100, steps_per_round=1, rounds=1
        )
    assert "100" not in str(err.value)


def test_the_record_level_plan_and_its_refusals_do_not_depend_on_the_record_count():
    # A node's epsilon and refusal texts reach the coordinator: they must not pin its record count.
    settings = RecordLevel(epsilon=2.0, sample_rate=0.05)
    small, large = (plan_record_level(settings, n, 12, 3) for n in (400, 37_123))
    assert small.noise_multiplier == large.noise_multiplier
    assert [small.epsilon_after(k) for k in (1, 2, 3)] == [
        large.epsilon_after(k) for k in (1, 2, 3)
    ]
    tight = settings.model_copy(update={"epsilon": 0.05, "max_noise_multiplier": 2.0})
    reasons = set()
    for n in (400, 37_123):
        with pytest.raises(InfeasiblePlan) as err:
            plan_record_level(tight, n, 12, 3)
        reasons.add(str(err.value))
    assert len(reasons) == 1 and "400" not in reasons.pop()


def test_epsilon_at_a_larger_delta_is_smaller_and_matches_the_accountant():
    record = plan_record_level(RecordLevel(epsilon=4.0), 400, 12, 3)
    at_node = record.epsilon_after(3, 1e-3)
    assert at_node < record.epsilon_after(3) and at_node == pytest.approx(
        gaussian_epsilon(record.noise_multiplier, 0.02, 36, 1e-3, "rdp")
    )
    enterprise = plan_enterprise_level(EnterpriseLevel(epsilon=4.0), rounds=3)
    assert enterprise.epsilon_after(3, 1e-3) == pytest.approx(
        gaussian_epsilon_analytic(enterprise.noise_multiplier, 1e-3, math.sqrt(3))
    )
    both = plan_run(PrivacySettings(enterprise=EnterpriseLevel(epsilon=4.0)), 1, 1, 3)
    assert both.epsilon_after("enterprise", 3, 1e-3) == (enterprise.epsilon_after(3, 1e-3), 1e-3)


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_replace_one_adjacency_doubles_the_sensitivity(mechanism):
    zero_out, replace_one = (
        plan_enterprise_level(
            EnterpriseLevel(epsilon=4.0, mechanism=mechanism, adjacency=adjacency), rounds=3
        )
        for adjacency in ("zero-out", "replace-one")
    )
    assert replace_one.noise_multiplier == pytest.approx(2 * zero_out.noise_multiplier)
    assert replace_one.epsilon_after(3) == pytest.approx(4.0, abs=1e-9)
    assert zero_out.epsilon_after(3) == pytest.approx(4.0, abs=1e-9)
    # The zero-out plan's noise, analysed under replace-one, spends far more than its target.
    loose = EnterprisePlan(
        mechanism, zero_out.clip, zero_out.noise_multiplier, 3, zero_out.delta, sensitivity=2.0
    )
    assert loose.epsilon_after(3) > 7.0


def test_laplace_shares_sum_to_exactly_laplace():
    scale, shares, n = 2.0, 3, 200_000
    rng = seeded_uniform(7)
    total = sum(laplace_share_noise(n, scale, shares, rng) for _ in range(shares))
    assert stats.kstest(total, stats.laplace(scale=scale).cdf).pvalue > 0.01
    # A factor-2 error in the scale (or summing full-scale noises) fails these bounds by far.
    assert np.mean(np.abs(total)) == pytest.approx(scale, rel=0.02)
    single = laplace_share_noise(n, scale, shares, rng)
    assert np.var(single) == pytest.approx(2 * scale**2 / shares, rel=0.03)


def test_gaussian_shares_carry_the_full_noise_for_the_fewest_contributors():
    plan = plan_enterprise_level(EnterpriseLevel(epsilon=2.0), rounds=3)
    rng = seeded_uniform(3)
    zero = [np.zeros(50_000, np.float32)]
    shares = [
        privatize_update(zero, plan, shares=4, uniform=rng)[0][0].astype(np.float64)
        for _ in range(4)
    ]
    assert np.std(sum(shares)) == pytest.approx(plan.noise_scale, rel=0.02)


@pytest.mark.parametrize("mechanism, norm", [("gaussian", l2_norm), ("laplace", l1_norm)])
def test_update_is_clipped_to_the_bound_before_noise(mechanism, norm):
    plan = plan_enterprise_level(
        EnterpriseLevel(epsilon=8.0, mechanism=mechanism, clip=0.7), rounds=1
    )
    update = [np.full((3, 4), 5.0, np.float32), np.arange(6, dtype=np.float32)]
    noised, before = privatize_update(update, plan, uniform=seeded_uniform(1))
    assert before == pytest.approx(norm(update))
    # Reference: clip, then the same noise draws.
    rng = seeded_uniform(1)
    if mechanism == "gaussian":
        clipped, _ = clip_l2(update, 0.7)
        noise = gaussian_noise(18, plan.noise_scale, rng)
        expected = [clipped[0] + noise[:12].reshape(3, 4), clipped[1] + noise[12:]]
        for got, want in zip(noised, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    clipped_only = [
        n - (n - u * min(1.0, 0.7 / before)) for n, u in zip(noised, update, strict=True)
    ]
    assert norm(clipped_only) <= 0.7 * (1 + 1e-6)

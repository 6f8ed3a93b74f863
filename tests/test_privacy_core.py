"""Mechanisms, calibration and accountants against published reference values."""

import math

import numpy as np
import pytest
import scipy.stats
from privacy_refs import PLD_REFS, PRV_REFS, RDP_REFS

from fedmoe.privacy.accounting import gaussian_epsilon, laplace_epsilon, noise_multiplier_for
from fedmoe.privacy.mechanisms import (
    add_noise,
    clip_l1,
    clip_l2,
    gaussian_delta,
    gaussian_noise,
    gaussian_sigma,
    l1_norm,
    l2_norm,
    laplace_noise,
    laplace_scale,
    secure_uniform,
    seeded_uniform,
)


@pytest.mark.parametrize("sigma, q, steps, delta, expected", RDP_REFS)
def test_rdp_matches_reference(sigma, q, steps, delta, expected):
    assert gaussian_epsilon(sigma, q, steps, delta, "rdp") == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("sigma, q, steps, delta, expected", PRV_REFS)
def test_prv_matches_reference(sigma, q, steps, delta, expected):
    assert gaussian_epsilon(sigma, q, steps, delta, "prv") == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("sigma, q, steps, delta, expected", PLD_REFS)
def test_pld_matches_reference(sigma, q, steps, delta, expected):
    assert gaussian_epsilon(sigma, q, steps, delta, "pld") == pytest.approx(expected, abs=0.02)


def test_analytic_gaussian_matches_balle_wang():
    assert gaussian_sigma(1.0, 1e-5) == pytest.approx(3.7306, abs=1e-3)
    # Tight: the calibrated sigma meets delta exactly; the classic formula over-noises.
    sigma = gaussian_sigma(0.5, 1e-6, sensitivity=2.0)
    assert gaussian_delta(sigma, 0.5, 2.0) == pytest.approx(1e-6, rel=1e-6)
    assert sigma < 2.0 * math.sqrt(2 * math.log(1.25 / 1e-6)) / 0.5
    assert gaussian_sigma(8.0, 1e-5) < gaussian_sigma(1.0, 1e-5)


def test_laplace_noise_has_scale_sensitivity_over_epsilon():
    b = laplace_scale(epsilon=0.5, sensitivity=2.0)
    assert b == 4.0
    x = laplace_noise(400_000, b, seeded_uniform(0))
    # E|X| = b and Var X = 2 b^2; a factor-2 error in the scale misses both bounds by far.
    assert np.mean(np.abs(x)) == pytest.approx(b, rel=0.01)
    assert np.var(x) == pytest.approx(2 * b * b, rel=0.02)
    assert abs(np.mean(x)) < 0.05


def test_gaussian_noise_std_and_secure_source():
    x = gaussian_noise(400_001, 3.0, seeded_uniform(1))
    assert x.shape == (400_001,) and np.std(x) == pytest.approx(3.0, rel=0.01)
    # The whole distribution, not two moments: a sampler with the right std and the wrong shape
    # (heavier or lighter tails) would void the accountant's Gaussian assumption.
    assert scipy.stats.kstest(x / 3.0, "norm").pvalue > 1e-3
    assert np.mean(np.abs(x) > 3 * 3.0) == pytest.approx(2 * scipy.stats.norm.sf(3), rel=0.05)
    u = secure_uniform(100_000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert not np.array_equal(gaussian_noise(10, 1.0), gaussian_noise(10, 1.0))


def test_clipping_bounds_the_joint_norm_and_leaves_small_updates_alone():
    rng = np.random.default_rng(0)
    big = [rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=7).astype(np.float32)]
    clipped, before = clip_l2(big, 0.5)
    assert before > 0.5 and l2_norm(clipped) == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_allclose(
        clipped[0] / big[0], clipped[1][0] / big[1][0], rtol=1e-5
    )  # one common factor
    small, _ = clip_l2(big, 1e6)
    assert all(np.array_equal(a, b) for a, b in zip(small, big, strict=True))
    clipped1, _ = clip_l1(big, 1.0)
    assert l1_norm(clipped1) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="> 0"):
        clip_l2(big, 0)


def test_add_noise_keeps_shapes_and_dtypes():
    tensors = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]
    noised = add_noise(tensors, lambda n: np.arange(n, dtype=np.float64))
    assert [t.shape for t in noised] == [(2, 3), (4,)] and noised[1].dtype == np.float32
    np.testing.assert_array_equal(noised[1], [6, 7, 8, 9])


def test_calibration_meets_the_target_and_is_tight():
    sigma = noise_multiplier_for(2.0, 0.01, 1000, 1e-5, "rdp")
    assert gaussian_epsilon(sigma, 0.01, 1000, 1e-5) <= 2.0
    assert gaussian_epsilon(sigma * 0.99, 0.01, 1000, 1e-5) > 2.0
    assert laplace_epsilon(0.25, 4) == 1.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: gaussian_epsilon(0, 0.1, 10, 1e-5), "noise_multiplier"),
        (lambda: gaussian_epsilon(1, 1.5, 10, 1e-5), "sample_rate"),
        (lambda: gaussian_epsilon(1, 0.1, 10, 1.0), "delta"),
        (lambda: gaussian_epsilon(1, 0.1, 10, 1e-5, "gdp"), "accountant"),
        (lambda: gaussian_sigma(0, 1e-5), "epsilon"),
        (lambda: laplace_scale(-1), "epsilon"),
        (lambda: noise_multiplier_for(0, 0.1, 10, 1e-5), "target epsilon"),
    ],
)
def test_bad_privacy_parameters_are_refused_with_the_allowed_range(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_noise_comes_from_the_os_csprng_by_default(monkeypatch):
    """Replacing os.urandom makes the default noise fixed: the OS CSPRNG alone keys the default source."""
    import fedmoe.privacy.mechanisms as mechanisms

    monkeypatch.setattr(
        mechanisms.os, "urandom", lambda n: bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    )
    np.testing.assert_array_equal(gaussian_noise(64, 1.0), gaussian_noise(64, 1.0))
    np.testing.assert_array_equal(laplace_noise(64, 1.0), laplace_noise(64, 1.0))

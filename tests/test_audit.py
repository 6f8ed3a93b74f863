"""The one-run privacy audit's statistics (privacy/audit.py): sound bounds, and canaries that are
secret, reproducible and half included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmoe.privacy.audit import (
    epsilon_lower_bound,
    make_canaries,
    p_value,
    score_guesses,
)


def test_all_guesses_right_without_delta_is_the_binomial_bound():
    # r right guesses of r: the largest eps with q(eps)^r <= 5%, q = e^eps / (1 + e^eps).
    for r in (20, 200, 1000):
        q = 0.05 ** (1 / r)
        expected = math.log(q / (1 - q))
        assert epsilon_lower_bound(r, r, r, delta=0.0) == pytest.approx(expected, rel=1e-6)


def test_the_bound_is_sound_for_a_mechanism_with_known_epsilon():
    """Randomized response at epsilon = 1 answers each guess right with probability e/(1+e):
    the 95% lower bound may exceed 1 in at most about 5% of audits."""
    rng = np.random.default_rng(0)
    q = math.e / (1 + math.e)
    trials, m = 400, 300
    over = sum(
        epsilon_lower_bound(m, m, int(rng.binomial(m, q)), delta=1e-5) > 1.0 for _ in range(trials)
    )
    assert over / trials <= 0.08


def test_p_value_grows_with_delta_and_shrinks_with_epsilon():
    assert p_value(100, 60, 50, 1.0, 1e-3) > p_value(100, 60, 50, 1.0, 0.0)
    assert p_value(100, 60, 50, 2.0, 1e-5) > p_value(100, 60, 50, 0.5, 1e-5)
    assert epsilon_lower_bound(100, 60, 30, 1e-5) == 0.0  # chance level refutes nothing
    assert epsilon_lower_bound(100, 60, 0, 1e-5) == 0.0


def test_canaries_are_reproducible_from_the_seed_and_half_included():
    tokens, included = make_canaries(b"s" * 32, 2000, 16, 500)
    again, again_in = make_canaries(b"s" * 32, 2000, 16, 500)
    np.testing.assert_array_equal(tokens, again)
    np.testing.assert_array_equal(included, again_in)
    assert tokens.shape == (2000, 16) and tokens.min() >= 0 and tokens.max() < 500
    assert 0.45 < included.mean() < 0.55
    other, other_in = make_canaries(b"t" * 32, 2000, 16, 500)
    assert not np.array_equal(tokens, other) and not np.array_equal(included, other_in)


def test_guesses_take_the_lowest_losses_as_in_and_the_highest_as_out():
    included = np.array([True, False, True, False, True, False])
    losses = np.array([0.1, 5.0, 0.2, 4.0, 3.0, 0.3])  # canary 4 (in) and 5 (out) look swapped
    assert score_guesses(losses, included, per_side=2) == (4, 4)
    assert score_guesses(losses, included, per_side=3) == (6, 4)
    with pytest.raises(ValueError):
        score_guesses(losses, included, per_side=4)

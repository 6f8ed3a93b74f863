"""FedAvg math against a hand computation, and refusal of malformed updates."""

import numpy as np
import pytest

from fedmoe.coordinator.round.aggregation import (
    MalformedUpdate,
    apply_update,
    check_update,
    l2_norm,
    weighted_average,
)


def test_weighted_average_matches_hand_computation():
    a = [np.array([1.0, 2.0], dtype=np.float32), np.array([[4.0]], dtype=np.float32)]
    b = [np.array([3.0, -2.0], dtype=np.float32), np.array([[0.0]], dtype=np.float32)]
    # weights 100 and 300: (100*1 + 300*3)/400 = 2.5, (200 - 600)/400 = -1, 400/400 = 1
    out = weighted_average([a, b], [100, 300])
    np.testing.assert_allclose(out[0], [2.5, -1.0])
    np.testing.assert_allclose(out[1], [[1.0]])
    assert out[0].dtype == np.float32


def test_equal_weights_is_the_plain_mean_and_apply_adds():
    rng = np.random.default_rng(0)
    updates = [[rng.normal(size=(3, 2))] for _ in range(4)]
    np.testing.assert_allclose(
        weighted_average(updates, [7] * 4)[0], np.mean([u[0] for u in updates], axis=0)
    )
    np.testing.assert_allclose(apply_update([np.ones(2)], [np.array([0.5, -1.0])])[0], [1.5, 0.0])
    assert l2_norm([np.array([3.0]), np.array([4.0])]) == 5.0


@pytest.mark.parametrize(
    "update, weight, match",
    [
        ([np.array([np.nan, 0.0])], 1, "NaN"),
        ([np.array([np.inf, 0.0])], 1, "NaN or inf"),
        ([np.zeros(3)], 1, "shape"),
        ([np.zeros(2), np.zeros(2)], 1, "expected 1 tensors"),
        ([np.zeros(2)], 0, "positive"),
    ],
)
def test_malformed_updates_are_refused(update, weight, match):
    with pytest.raises(MalformedUpdate, match=match):
        check_update(update, [np.zeros(2)], weight)

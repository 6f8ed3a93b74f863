"""The DP-SGD gradient: equal to a reference loop without noise, norm-bounded, noise at the right scale."""

import pytest
import torch

from fedmoe.privacy.dp_sgd import per_example_norms, private_gradient
from fedmoe.privacy.mechanisms import seeded_uniform


def _per_example(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(b, 3, 4, generator=g, dtype=torch.float64),
        "b": torch.randn(b, 5, generator=g, dtype=torch.float64) * 3,
    }


def test_without_noise_equals_a_reference_loop():
    per_example, clip = _per_example(), 2.0
    expected = {k: torch.zeros_like(v[0]) for k, v in per_example.items()}
    for i in range(6):
        norm = torch.sqrt(sum((v[i] ** 2).sum() for v in per_example.values()))
        scale = min(1.0, clip / norm.item())
        for k, v in per_example.items():
            expected[k] += v[i] * scale
    out = private_gradient(per_example, clip, noise_multiplier=0.0, expected_batch_size=4.0)
    for k in expected:
        torch.testing.assert_close(out[k], expected[k] / 4.0)


def test_each_example_contributes_at_most_the_clipping_bound():
    per_example = _per_example(b=1)
    for clip in (0.1, 1.0, 100.0):
        out = private_gradient(per_example, clip, 0.0, expected_batch_size=1.0)
        assert per_example_norms({k: v[None] for k, v in out.items()}).item() <= clip * (1 + 1e-9)


def test_noise_std_is_noise_multiplier_times_clip_over_batch():
    zeros = {"a": torch.zeros(2, 200_000, dtype=torch.float64)}
    out = private_gradient(
        zeros, clip=0.5, noise_multiplier=1.5, expected_batch_size=10.0, uniform=seeded_uniform(0)
    )
    assert float(out["a"].std()) == pytest.approx(1.5 * 0.5 / 10.0, rel=0.01)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clip": 0}, "clipping"),
        ({"noise_multiplier": -1}, "noise"),
        ({"expected_batch_size": 0}, "batch"),
    ],
)
def test_bad_parameters(kwargs, match):
    args = {"clip": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        private_gradient(_per_example(), **args)


def test_matches_opacus_dp_optimizer_clipping():
    """Opacus's DPOptimizer, fed the same per-example gradients (grad_sample_mode="no_op"), agrees."""
    from opacus.optimizers import DPOptimizer

    per_example = {k: v.float() for k, v in _per_example().items()}
    params = [torch.nn.Parameter(torch.zeros(v.shape[1:])) for v in per_example.values()]
    for p, g in zip(params, per_example.values(), strict=True):
        p.grad_sample = g.clone()
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=1.5,
        expected_batch_size=4,
    )
    opt.pre_step()
    ours = private_gradient(per_example, 1.5, 0.0, 4.0)
    for p, name in zip(params, per_example, strict=True):
        torch.testing.assert_close(p.grad, ours[name], atol=1e-6, rtol=1e-5)

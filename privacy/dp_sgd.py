"""One DP-SGD gradient from per-example gradients (Abadi et al. 2016).

Each example's gradient (all adapter tensors together) is clipped to L2 norm `clip`, the clipped
gradients are summed, Gaussian noise with std `noise_multiplier * clip` is added, and the sum is
divided by the EXPECTED batch size (Poisson sampling: dividing by the realised size would leak it).

`private_gradient` is that, as a pure reference function; training uses Opacus's `DPOptimizer`
(which also accumulates physical batches), with its noise drawn from our CSPRNG (mechanisms.py), and the tests
hold the two equal.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from fedmoe.privacy.mechanisms import UniformSource, gaussian_noise, secure_uniform


def per_example_norms(per_example: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] joint L2 norm of each example's gradient over all tensors: squares summed into a
    float64 accumulator (no float64 copy of any gradient, which would double the step's memory)."""
    squares = [
        g.reshape(g.shape[0], -1).square().sum(dim=1, dtype=torch.float64)
        for g in per_example.values()
    ]
    return torch.stack(squares).sum(dim=0).sqrt()


def private_gradient(
    per_example: dict[str, torch.Tensor],
    clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    uniform: UniformSource = secure_uniform,
) -> dict[str, torch.Tensor]:
    """Clip per example, sum, add N(0, (noise_multiplier * clip)^2), divide by the expected batch size."""
    if not clip > 0:
        raise ValueError(f"clipping bound must be > 0, got {clip}")
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if not expected_batch_size > 0:
        raise ValueError(f"expected batch size must be > 0, got {expected_batch_size}")
    norms = per_example_norms(per_example)
    factors = (clip / (norms + 1e-12)).clamp(max=1.0)
    summed = [torch.einsum("b,b...->...", factors.to(g.dtype), g) for g in per_example.values()]
    if noise_multiplier > 0:
        noises = noise_like(summed, noise_multiplier * clip, uniform)
        summed = [s + noise for s, noise in zip(summed, noises, strict=True)]
    return {name: s / expected_batch_size for name, s in zip(per_example, summed, strict=True)}


def noise_like(
    tensors: list[torch.Tensor], std: float, uniform: UniformSource
) -> list[torch.Tensor]:
    """N(0, std^2) noise shaped like each tensor (on its device, in its dtype), drawn as ONE vector:
    a draw per tensor would pay the CSPRNG's set-up once per adapter tensor (dozens a step)."""
    noise = torch.from_numpy(gaussian_noise(sum(t.numel() for t in tensors), std, uniform))
    parts = noise.split([t.numel() for t in tensors])
    return [part.to(t).view_as(t) for part, t in zip(parts, tensors, strict=True)]


class SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer (per-example clipping over `p.grad_sample`, accumulation over physical
    batches, scaling by the expected batch size), with its Gaussian noise drawn from our CSPRNG
    instead of torch's generator, whose state an attacker could recover."""

    def __init__(self, *args, uniform: UniformSource = secure_uniform, **kwargs):
        super().__init__(*args, **kwargs)
        self.uniform = uniform

    def add_noise(self):
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        summed = [p.summed_grad for p in self.params]
        noises = (
            noise_like(summed, std, self.uniform)
            if std > 0
            else [torch.zeros_like(s) for s in summed]
        )
        for p, noise in zip(self.params, noises, strict=True):
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

"""One DP-SGD gradient from per-example gradients (Abadi et al. 2016).

Each example's gradient (all adapter tensors together) is clipped to L2 norm `clip`, the clipped
gradients are summed, Gaussian noise with std `noise_multiplier * clip` is added, and the sum is
divided by the EXPECTED batch size (Poisson sampling: dividing by the realised size would leak it).

`private_gradient` is that, as a pure reference function; training uses Opacus's `DPOptimizer`
(which also accumulates physical batches), with its noise drawn from our CSPRNG (mechanisms.py), and the tests
hold the two equal.
"""

from __future__ import annotations

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from fedmoe.privacy.mechanisms import UniformSource, gaussian_noise, secure_uniform


def per_example_norms(per_example: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] joint L2 norm of each example's gradient over all tensors, summed in float64 a slice at
    a time (a float64 copy of every gradient would double the step's memory)."""
    squares = [
        sum(part.double().pow(2).sum(dim=1) for part in g.reshape(g.shape[0], -1).split(1 << 16, 1))
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
    out = {}
    for name, g in per_example.items():
        summed = torch.einsum("b,b...->...", factors.to(g.dtype), g)
        if noise_multiplier > 0:
            noise = gaussian_noise(summed.numel(), noise_multiplier * clip, uniform)
            summed = summed + torch.from_numpy(noise).to(summed.dtype).view(summed.shape)
        out[name] = summed / expected_batch_size
    return out


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
            noise = (
                gaussian_noise(p.summed_grad.numel(), std, self.uniform)
                if std > 0
                else np.zeros(p.summed_grad.numel())
            )
            p.grad = (
                p.summed_grad + torch.from_numpy(noise).to(p.summed_grad).view_as(p.summed_grad)
            ).view_as(p)
            _mark_as_processed(p.summed_grad)

"""Record-level DP-SGD on one enterprise's records: Opacus does Poisson sampling, per-example
clipping, noise and the accumulation of physical batches; we supply exact per-example gradients.

Opacus's own per-sample hooks treat routed tokens as samples on MoE experts, so exact per-example
gradients come from privacy/per_example.py (one batched backward pass; tested against `torch.func`
vmap and batch-size-1 references) and are handed to Opacus's optimizer as `p.grad_sample` (its
`no_op` grad-sample mode). Each example's loss is
its own per-sequence mean; DeepSeek-V3 has no router auxiliary loss, and we never add one, so no
example's gradient depends on another's.
"""

from __future__ import annotations

import os

import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import TensorDataset

from fedmoe.client.trainer import LocalTrainResult
from fedmoe.contract.round import LocalTrainSettings
from fedmoe.model.lora import adapter_parameters
from fedmoe.privacy.dp_sgd import SecureNoiseDPOptimizer
from fedmoe.privacy.mechanisms import UniformSource, secure_uniform
from fedmoe.privacy.per_example import per_example_gradients
from fedmoe.privacy.plan import RecordPlan


def _unpredictable_generator() -> torch.Generator:
    # Poisson sampling must be secret for the amplification the accountant counts on.
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def train_local_private(
    model: nn.Module,
    records: torch.Tensor,
    settings: LocalTrainSettings,
    plan: RecordPlan,
    clip: float,
    max_physical_batch_size: int,
    device: torch.device,
    uniform: UniformSource = secure_uniform,
    generator: torch.Generator | None = None,
) -> LocalTrainResult:
    """`plan.steps_per_round` DP-SGD steps (AdamW on the privatized gradient) over `records` ([N, T])."""
    params = adapter_parameters(model)
    if not params:
        raise RuntimeError("the model has no trainable adapter tensors")
    optimizer = SecureNoiseDPOptimizer(
        torch.optim.AdamW(params.values(), lr=settings.lr, weight_decay=settings.weight_decay),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=clip,
        expected_batch_size=max(1, round(plan.expected_batch_size)),
        uniform=uniform,
    )
    taken: list[int] = []
    optimizer.attach_step_hook(
        lambda _: taken.append(1)
    )  # Opacus runs step hooks only on real steps, not on skipped physical ones
    loader = DPDataLoader(
        TensorDataset(records),
        sample_rate=plan.sample_rate,
        generator=generator or _unpredictable_generator(),
    )
    sequences = 0
    model.train()
    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=max_physical_batch_size, optimizer=optimizer
    ) as batches:
        while len(taken) < plan.steps_per_round:
            for (batch,) in batches:
                if batch.shape[0]:
                    grads = per_example_gradients(model, batch.to(device))
                else:  # an empty Poisson batch: no example, only noise
                    grads = {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}
                for name, p in params.items():
                    p.grad_sample = grads[name]
                sequences += batch.shape[0]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if len(taken) == plan.steps_per_round:
                    break
    model.eval()
    return LocalTrainResult(
        mean_loss=None, steps=len(taken), sequences_seen=sequences, expert_load={}
    )

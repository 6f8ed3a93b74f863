"""Local LoRA training and evaluation on one enterprise's data (plain torch, no Flower)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fedmoe.contract.round import LocalTrainSettings
from fedmoe.model.lora import adapter_parameters, expert_lora_modules
from fedmoe.model.loss import autocast_context, per_sequence_loss


@dataclass
class ExpertLoadCounter:
    """Counts the tokens each routed expert receives, per MoE layer, through forward hooks."""

    model: nn.Module
    counts: dict[int, torch.Tensor] = field(default_factory=dict)

    def __enter__(self) -> ExpertLoadCounter:
        self._handles = []
        for layer, module in expert_lora_modules(self.model).items():
            num_experts = module.gate_up_A.shape[0]
            self.counts[layer] = torch.zeros(num_experts, dtype=torch.long)

            def hook(_module, args, _output, layer=layer, num_experts=num_experts):
                self.counts[layer] += torch.bincount(
                    args[1].reshape(-1).cpu(), minlength=num_experts
                )

            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def as_lists(self) -> dict[str, list[int]]:
        return {str(layer): c.tolist() for layer, c in self.counts.items()}


@dataclass
class LocalTrainResult:
    mean_loss: float | None  # None under DP-SGD: the loss of the data is not released
    steps: int
    sequences_seen: int
    expert_load: dict[str, list[int]]


def train_local(
    model: nn.Module,
    blocks: torch.Tensor,
    settings: LocalTrainSettings,
    seed: int,
    device: torch.device,
) -> LocalTrainResult:
    """`settings.local_steps` AdamW steps on random batches of `blocks` ([num_blocks, seq_len])."""
    params = list(adapter_parameters(model).values())
    if not params:
        raise RuntimeError("the model has no trainable adapter tensors")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(settings.batch_size, blocks.shape[0])
    losses = []
    model.train()
    with ExpertLoadCounter(model) as load:
        for _ in range(settings.local_steps):
            batch = blocks[
                torch.randint(0, blocks.shape[0], (batch_size,), generator=generator)
            ].to(device)
            with autocast_context(device):
                loss = per_sequence_loss(model, batch).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"local training loss became {loss.item()}; lower train.lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    return LocalTrainResult(
        sum(losses) / len(losses), len(losses), len(losses) * batch_size, load.as_lists()
    )

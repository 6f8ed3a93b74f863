"""Per-example gradients of every trainable tensor equal batch-size-1 backward passes."""

import torch
from conftest import tiny_model

from fedmoe.client.trainer import per_sequence_loss
from fedmoe.model.lora import LoraSettings, adapter_parameters, attach_lora
from fedmoe.privacy.per_example import per_example_gradients


def test_per_example_gradients_equal_batch_size_one_backward():
    model = attach_lora(tiny_model(), LoraSettings(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move B off zero so every factor has a non-trivial gradient
        for p in adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=g)
    per_example = per_example_gradients(model, ids)
    params = adapter_parameters(model)
    groups = {"self_attn", "shared_experts", "mlp.experts"}
    assert all(any(grp in n for n in per_example) for grp in groups)
    for i in range(ids.shape[0]):
        model.zero_grad()
        per_sequence_loss(model, ids[i : i + 1]).sum().backward()
        for name, p in params.items():
            assert per_example[name].shape == (4, *p.shape)
            torch.testing.assert_close(per_example[name][i], p.grad, atol=1e-5, rtol=1e-4, msg=name)

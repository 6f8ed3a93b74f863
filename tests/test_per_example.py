"""Per-example gradients of every trainable tensor equal batch-size-1 backward passes."""

import pytest
import torch
from conftest import many_expert_model, tiny_model

from fedmoe.model.data import PADDING
from fedmoe.model.lora import adapter_parameters, attach_lora, expert_lora_modules
from fedmoe.model.loss import per_sequence_loss
from fedmoe.model.settings import LoraSettings
from fedmoe.privacy.per_example import per_example_gradients


@pytest.mark.parametrize(
    "make_model",
    [tiny_model, lambda: many_expert_model("v2"), lambda: many_expert_model("v3")],
    ids=["v3-4-experts", "v2-16-experts-top6", "v3-16-experts-top4"],
)
def test_per_example_gradients_equal_batch_size_one_backward(make_model):
    model = attach_lora(make_model(), LoraSettings(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move B off zero so every factor has a non-trivial gradient
        for p in adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=g)
    ids[1, 7:] = PADDING  # a padded record: its padding must add nothing to its gradient
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


def _vmap_reference(model, ids):
    """The torch.func way (vmap of grad over the batch) on the dense expert form: slower, kept as
    an independent check."""
    from torch.func import functional_call, grad, vmap

    for module in expert_lora_modules(model).values():
        module.dense = True
    params = {n: p.detach() for n, p in adapter_parameters(model).items()}

    def loss(p, row):
        return per_sequence_loss(
            lambda **kw: functional_call(model, p, args=(), kwargs=kw), row.unsqueeze(0)
        )[0]

    return vmap(grad(loss), in_dims=(None, 0))(params, ids)


def test_per_example_gradients_equal_torch_func_vmap_with_padded_records():
    model = attach_lora(tiny_model(), LoraSettings(r=2, alpha=4, init_seed=3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=g)
    ids[0, 6:] = PADDING
    ours = per_example_gradients(model, ids)
    reference = _vmap_reference(model, ids)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], atol=1e-6, rtol=1e-4, msg=name)

"""Routed-expert LoRA: equal to the base at init, equal to a per-token reference, vmap-ready."""

import pytest
import torch
from conftest import tiny_model
from torch.func import functional_call, grad, vmap

from fedmoe.model.expert_lora import ExpertLoRA, routed_experts_forward
from fedmoe.model.lora import attach_lora, expert_lora_modules
from fedmoe.model.settings import LoraSettings


def _moe_layer(model):
    return next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts"))


def _routing(mlp, x):
    _, weights, idx = mlp.gate(x)
    return idx, weights


def test_zero_init_equals_base_experts(tiny):
    mlp = _moe_layer(tiny)
    x = torch.randn(10, tiny.config.hidden_size)
    idx, w = _routing(mlp, x)
    expected = mlp.experts(x, idx, w)
    wrapped = ExpertLoRA(mlp.experts, r=4, alpha=8)
    torch.testing.assert_close(wrapped(x, idx, w), expected, atol=1e-6, rtol=1e-5)


def test_zero_init_model_logits_unchanged():
    base = tiny_model()
    ids = torch.randint(0, base.config.vocab_size, (2, 12))
    expected = base(ids).logits
    adapted = attach_lora(tiny_model(), LoraSettings(r=4, alpha=8))
    torch.testing.assert_close(adapted(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_matches_per_token_reference_with_merged_weights(tiny):
    mlp = _moe_layer(tiny)
    wrapped = ExpertLoRA(mlp.experts, r=4, alpha=8)
    with torch.no_grad():
        for p in wrapped.factors():
            p.normal_(0, 0.2)
    x = torch.randn(7, tiny.config.hidden_size)
    idx, w = _routing(mlp, x)
    gu = mlp.experts.gate_up_proj + wrapped.scaling * wrapped.gate_up_B @ wrapped.gate_up_A
    dn = mlp.experts.down_proj + wrapped.scaling * wrapped.down_B @ wrapped.down_A
    expected = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for slot in range(idx.shape[1]):
            e = idx[n, slot]
            gate, up = (gu[e] @ x[n]).chunk(2)
            expected[n] += w[n, slot] * (dn[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(wrapped(x, idx, w), expected, atol=1e-5, rtol=1e-4)
    # Folding the factors into the base gives the same function.
    merged = wrapped.merged_base()
    torch.testing.assert_close(merged(x, idx, w), expected, atol=1e-5, rtol=1e-4)


def test_per_example_gradients_by_vmap_equal_batch_size_one():
    """The module is written so that torch.func can take exact per-example gradients."""
    model = attach_lora(tiny_model(), LoraSettings(r=4, alpha=8, targets=("routed_experts",)))
    with torch.no_grad():
        for m in expert_lora_modules(model).values():
            m.gate_up_B.normal_(0, 0.1)
            m.down_B.normal_(0, 0.1)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("mlp.experts." in n for n in params)
    ids = torch.randint(0, model.config.vocab_size, (3, 10))

    def loss_one(p, seq):
        logits = functional_call(model, p, (seq.unsqueeze(0),)).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, seq[1:])

    per_example = vmap(grad(loss_one), in_dims=(None, 0))(params, ids)
    for i in range(ids.shape[0]):
        reference = grad(loss_one)(params, ids[i])
        for name in params:
            torch.testing.assert_close(per_example[name][i], reference[name], atol=1e-5, rtol=1e-4)


def test_rejects_non_fused_module():
    with pytest.raises(TypeError, match="fused experts"):
        ExpertLoRA(torch.nn.Linear(2, 2), r=2, alpha=4)


def test_functional_form_without_lora_matches_transformers(tiny):
    mlp = _moe_layer(tiny)
    x = torch.randn(5, tiny.config.hidden_size)
    idx, w = _routing(mlp, x)
    out = routed_experts_forward(
        x, idx, w, mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.experts.act_fn
    )
    torch.testing.assert_close(out, mlp.experts(x, idx, w), atol=1e-6, rtol=1e-5)

"""Routed-expert LoRA: equal to the base at init, to a per-token reference, and sparse to dense."""

import pytest
import torch
from conftest import many_expert_model, tiny_model

from fedmoe.model.expert_lora import (
    ExpertLoRA,
    dense_routed_experts_forward,
    group_by_expert,
    routed_experts_forward,
)
from fedmoe.model.lora import adapter_parameters, attach_lora, expert_lora_modules
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


def _set_dense(model, dense: bool) -> None:
    for module in expert_lora_modules(model).values():
        module.dense = dense


@pytest.mark.parametrize("family", ["v2", "v3"])
def test_sparse_equals_dense_outputs_and_gradients(family):
    model = attach_lora(many_expert_model(family), LoraSettings(r=4, alpha=8))
    g = torch.Generator().manual_seed(2)
    params = adapter_parameters(model)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=g)
    results = []
    for dense in (False, True):
        _set_dense(model, dense)
        model.zero_grad()
        logits = model(ids).logits
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in params.items()}))
    (sparse_logits, sparse_grads), (dense_logits, dense_grads) = results
    assert any("mlp.experts." in n for n in sparse_grads)
    torch.testing.assert_close(sparse_logits, dense_logits, atol=1e-5, rtol=1e-5)
    for name in params:
        torch.testing.assert_close(
            sparse_grads[name], dense_grads[name], atol=1e-5, rtol=1e-4, msg=name
        )


def test_rejects_non_fused_module():
    with pytest.raises(TypeError, match="fused experts"):
        ExpertLoRA(torch.nn.Linear(2, 2), r=2, alpha=4)


@pytest.mark.parametrize("forward", [routed_experts_forward, dense_routed_experts_forward])
@pytest.mark.parametrize("family", ["v2", "v3"])
def test_functional_form_without_lora_matches_transformers(forward, family):
    mlp = _moe_layer(many_expert_model(family))
    x = torch.randn(9, mlp.experts.gate_up_proj.shape[2])
    idx, w = _routing(mlp, x)
    out = forward(x, idx, w, mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.experts.act_fn)
    torch.testing.assert_close(out, mlp.experts(x, idx, w), atol=1e-6, rtol=1e-5)


def test_experts_no_token_chose_get_zero_gradient_and_cost_nothing(tiny):
    mlp = _moe_layer(tiny)
    wrapped = ExpertLoRA(mlp.experts, r=2, alpha=4)
    x = torch.randn(6, tiny.config.hidden_size)
    idx = torch.tensor([[0, 2]] * 6)  # experts 1 and 3 get no token
    groups = group_by_expert(idx, torch.ones(6, 2), num_experts=4)
    assert groups.counts == (6, 0, 6, 0)
    assert groups.token.tolist() == list(range(6)) * 2  # token order within each expert
    with torch.no_grad():
        wrapped.gate_up_B.normal_(0, 0.1)
        wrapped.down_B.normal_(0, 0.1)
    wrapped(x, idx, torch.full((6, 2), 0.5)).sum().backward()
    for factor in wrapped.factors():
        assert factor.grad[[1, 3]].abs().sum() == 0
        assert factor.grad[[0, 2]].abs().sum() > 0

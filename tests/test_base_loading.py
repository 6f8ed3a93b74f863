"""Real bases: bfloat16, int8- and NF4-expert bases train, their fingerprints tell them apart,
checkpointing keeps per-example gradients exact, and a base too large for the device is refused."""

import pytest
import torch

from fedmoe.contract.round import LocalTrainSettings
from fedmoe.model import base as base_module
from fedmoe.model.base import fingerprint, load_base
from fedmoe.model.lora import adapter_parameters, attach_lora, expert_lora_modules
from fedmoe.model.loss import per_sequence_loss
from fedmoe.model.quantize import NF4_LEVELS, QuantizedExperts, quantize
from fedmoe.model.settings import BaseLoading, LoraSettings
from fedmoe.privacy.per_example import per_example_gradients

ALL = LoraSettings(r=4, alpha=8)


def _train_and_measure(loading: BaseLoading) -> tuple[float, float]:
    """Loss on a fixed batch before and after 15 steps of local training on it."""
    from fedmoe.client.trainer import train_local

    model = attach_lora(load_base("embedded", loading), ALL)
    batch = torch.randint(3, 2048, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = per_sequence_loss(model, batch).mean().item()
    settings = LocalTrainSettings(local_steps=15, batch_size=4, seq_len=32, lr=1e-2)
    train_local(model, batch, settings, seed=0, device=torch.device("cpu"))
    with torch.no_grad():
        after = per_sequence_loss(model, batch).mean().item()
    return before, after


@pytest.mark.parametrize(
    "loading",
    [BaseLoading(dtype="bfloat16"), BaseLoading(quantize="int8"), BaseLoading(quantize="nf4")],
    ids=["bfloat16", "int8-experts", "nf4-experts"],
)
def test_a_low_precision_base_trains_full_precision_lora(loading):
    model = attach_lora(load_base("embedded", loading), ALL)
    assert all(p.dtype == torch.float32 for p in adapter_parameters(model).values())
    if loading.quantize != "none":
        experts = [m.base for m in expert_lora_modules(model).values()]
        assert experts and all(isinstance(m, QuantizedExperts) for m in experts)
        packed = experts[0].gate_up_proj_values
        assert packed.dtype == (torch.int8 if loading.quantize == "int8" else torch.uint8)
    before, after = _train_and_measure(loading)
    assert after < 0.8 * before


@pytest.mark.parametrize("scheme, logit_error", [("int8", 0.01), ("nf4", 0.05)])
def test_quantized_experts_stay_close_to_the_base_and_have_their_own_fingerprint(
    scheme, logit_error
):
    full = load_base("embedded")
    quantized = load_base("embedded", BaseLoading(quantize=scheme))
    again = load_base("embedded", BaseLoading(quantize=scheme))
    assert fingerprint(quantized) == fingerprint(again) != fingerprint(full)
    ids = torch.randint(3, 2048, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, approximate = full(ids).logits, quantized(ids).logits
    # Mean, not max: a token whose routing flips between two near-equal experts differs more.
    assert (approximate - reference).abs().mean() / reference.abs().mean() < logit_error


def test_each_weight_rounds_to_its_nearest_level():
    w = torch.randn(3, 5, 128)
    int8 = quantize(w, "int8").dequantizer()
    nf4 = quantize(w, "nf4").dequantizer()
    largest_gap = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:], strict=False))
    for e in range(3):
        step = w[e].abs().amax(dim=-1, keepdim=True) / 127  # int8: per row
        assert ((int8(e) - w[e]).abs() <= step / 2 + 1e-7).all()
        absmax = w[e].view(5, 2, 64).abs().amax(dim=-1, keepdim=True)  # nf4: per block of 64
        error = (nf4(e).view(5, 2, 64) - w[e].view(5, 2, 64)).abs()
        assert (error <= absmax * largest_gap / 2 + 1e-6).all()
        assert torch.equal(nf4(e).abs().amax(dim=-1), w[e].abs().amax(dim=-1))  # +-1 is exact


def test_a_node_loads_the_base_as_the_round_says_and_a_mismatch_is_refused(tmp_path):
    from fedmoe.client.enterprise import _check_round, workspace
    from fedmoe.client.settings import NodeSettings

    node = NodeSettings(enterprise="finance", data=_demo("finance"), device="cpu")
    full = workspace(node, ALL, 32)
    int8 = workspace(node, ALL, 32, BaseLoading(quantize="int8"))
    assert int8.base_fingerprint == fingerprint(load_base("embedded", BaseLoading(quantize="int8")))
    assert int8.base_fingerprint != full.base_fingerprint

    class Spec:  # what _check_round reads of a RoundSpec
        base_fingerprint = full.base_fingerprint
        adapter_layout = int8.layout

    with pytest.raises(RuntimeError, match="base model mismatch"):
        _check_round(int8, Spec())


def _demo(name: str):
    from fedmoe.model.corpus import DEMO_DATA_DIR

    return DEMO_DATA_DIR / name


@pytest.mark.parametrize(
    "loading",
    [BaseLoading(quantize="int8"), BaseLoading(quantize="nf4"), BaseLoading(dtype="bfloat16")],
)
def test_per_example_gradients_stay_exact_with_checkpointing_on_low_precision_bases(loading):
    checkpointed = loading.model_copy(update=dict(gradient_checkpointing=True))
    model = attach_lora(load_base("embedded", checkpointed), ALL)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.train()
    ids = torch.randint(3, 2048, (3, 16), generator=g)
    per_example = per_example_gradients(model, ids)
    params = adapter_parameters(model)
    tolerance = 1e-5 if loading.dtype == "float32" else 2e-2
    for i in range(ids.shape[0]):
        model.zero_grad()
        per_sequence_loss(model, ids[i : i + 1]).sum().backward()
        for name, p in params.items():
            torch.testing.assert_close(
                per_example[name][i], p.grad, atol=tolerance, rtol=tolerance, msg=name
            )


def test_a_base_too_large_for_the_device_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(base_module, "free_bytes", lambda device: 1 << 20)
    monkeypatch.setattr(
        "transformers.AutoModelForCausalLM.from_pretrained",
        lambda *a, **k: pytest.fail("the weights were read"),
    )
    with pytest.raises(ValueError, match=r"needs \d MiB as loaded.*cpu has 1 MiB free.*nf4"):
        load_base("embedded", BaseLoading(dtype="bfloat16"))
    needed = base_module.base_bytes(base_module.EMBEDDED_BASE_DIR, BaseLoading())
    halved = base_module.base_bytes(base_module.EMBEDDED_BASE_DIR, BaseLoading(dtype="bfloat16"))
    int8 = base_module.base_bytes(base_module.EMBEDDED_BASE_DIR, BaseLoading(quantize="int8"))
    nf4 = base_module.base_bytes(base_module.EMBEDDED_BASE_DIR, BaseLoading(quantize="nf4"))
    assert halved == needed // 2 and nf4 < int8 < needed

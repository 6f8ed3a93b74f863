"""LoRA lands on exactly the intended modules, only adapters train, and adapters round-trip."""

import json
import re

import pytest
import torch
from conftest import many_expert_model, tiny_model
from pydantic import ValidationError

from fedmoe.model.expert_lora import ExpertLoRA
from fedmoe.model.lora import (
    adapter_layout,
    adapter_parameters,
    attach_lora,
    get_adapter_tensors,
    load_adapter,
    lora_layer_indices,
    merge_adapter,
    save_adapter,
    set_adapter_tensors,
)
from fedmoe.model.peft_format import write_peft_adapter
from fedmoe.model.settings import LoraSettings

ALL_GROUPS = ("attention", "shared_experts", "routed_experts")

ATTN = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}


def _lora_linear_modules(model) -> set[str]:
    names = set()
    for name, _ in model.named_parameters():
        m = re.match(r".*model\.layers\.(\d+)\.(.+)\.lora_A\.default\.weight$", name)
        if m:
            names.add(f"{m.group(1)}.{m.group(2)}")
    return names


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_exactly_the_intended_modules_get_lora():
    model = attach_lora(tiny_model(), LoraSettings(r=4, alpha=8))
    expected = {f"{i}.self_attn.{p}" for i in range(3) for p in ATTN}
    expected |= {
        f"{i}.mlp.shared_experts.{p}" for i in (1, 2) for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert _lora_linear_modules(model) == expected
    # Dense first-layer MLP and the router: no LoRA; routed experts: our module, layers 1 and 2 only.
    layers = model.get_base_model().model.layers
    assert not hasattr(layers[0].mlp.gate_proj, "lora_A")
    assert all(not isinstance(getattr(layers[i].mlp, "experts", None), ExpertLoRA) for i in (0,))
    assert all(isinstance(layers[i].mlp.experts, ExpertLoRA) for i in (1, 2))
    assert not any(
        "gate.weight" in n or "e_score_correction_bias" in n for n in adapter_parameters(model)
    )
    # peft must not have turned the shared-expert targets into routed-expert parametrizations.
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


def test_only_adapter_tensors_are_trainable():
    model = attach_lora(tiny_model(), LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(
        ("lora_A" in n or "lora_B" in n or re.search(r"experts\.(gate_up|down)_[AB]$", n))
        for n in trainable
    )


def test_top_layers_fraction_and_target_groups():
    assert lora_layer_indices(10, 0.2) == [8, 9]
    assert lora_layer_indices(3, 0.01) == [2]
    assert lora_layer_indices(3, 1.0) == [0, 1, 2]
    model = attach_lora(
        tiny_model(),
        LoraSettings(
            r=4, alpha=8, top_layers_fraction=0.3, targets=("shared_experts", "routed_experts")
        ),
    )
    assert _lora_linear_modules(model) == {
        f"2.mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert {n.split(".mlp")[0].rsplit(".", 1)[1] for n in adapter_parameters(model)} == {"2"}


def test_same_settings_give_the_same_initial_adapter():
    a = get_adapter_tensors(
        attach_lora(tiny_model(seed=0), LoraSettings(r=4, alpha=8, init_seed=3))
    )
    b = get_adapter_tensors(
        attach_lora(tiny_model(seed=0), LoraSettings(r=4, alpha=8, init_seed=3))
    )
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_save_and_reload_give_identical_logits(tmp_path):
    settings = LoraSettings(r=4, alpha=8)
    model = attach_lora(tiny_model(), settings)
    _perturb(model)
    ids = torch.randint(0, 64, (2, 10))
    expected = model(ids).logits
    save_adapter(model, settings, tmp_path / "adapter")
    reloaded = load_adapter(tiny_model(), tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=0, rtol=0)
    assert adapter_layout(reloaded) == adapter_layout(model)


@pytest.mark.parametrize(
    "targets",
    [("attention",), ("attention", "shared_experts"), ("routed_experts",), ALL_GROUPS],
)
def test_peft_from_pretrained_on_a_checkpoint_is_exact_or_fails_loudly(tmp_path, targets):
    from peft import PeftModel

    settings = LoraSettings(r=4, alpha=8, targets=targets)
    model = attach_lora(tiny_model(), settings)
    _perturb(model)
    save_adapter(model, settings, tmp_path / "a")
    if targets == ("attention",):
        loaded = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "a"))
        ids = torch.randint(0, 64, (1, 8))
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    else:
        with pytest.raises(KeyError, match="NOT LOADABLE BY PEFT ALONE.*fedmoe export"):
            PeftModel.from_pretrained(tiny_model(), str(tmp_path / "a"))


@pytest.mark.parametrize("family", ["v2", "v3"])
def test_the_peft_export_loads_with_plain_peft_to_the_fine_tuned_logits(tmp_path, family):
    from peft import PeftModel

    settings = LoraSettings(r=4, alpha=8, top_layers_fraction=0.7)
    model = attach_lora(many_expert_model(family), settings)
    _perturb(model)
    error = write_peft_adapter(model, settings, lambda: many_expert_model(family), tmp_path)
    assert error <= 1e-5
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert any("mlp.experts.gate_up_proj" in t for t in config["target_parameters"])
    loaded = PeftModel.from_pretrained(many_expert_model(family), str(tmp_path)).eval()
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_peft_export_that_peft_would_load_differently_is_refused_and_removed(
    tmp_path, monkeypatch
):
    from fedmoe.model import peft_format

    settings = LoraSettings(r=2, alpha=4)
    model = attach_lora(tiny_model(), settings)
    _perturb(model)
    make_twin = peft_format._peft_twin

    def twin_without_one_factor(*args):
        twin = make_twin(*args)
        with torch.no_grad():
            next(p for n, p in twin.named_parameters() if "experts.lora_B" in n).zero_()
        return twin

    monkeypatch.setattr(peft_format, "_peft_twin", twin_without_one_factor)
    with pytest.raises(ValueError, match="export with --merge"):
        write_peft_adapter(model, settings, tiny_model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_merge_equals_adapter(tmp_path):
    settings = LoraSettings(r=4, alpha=8)
    model = attach_lora(tiny_model(), settings)
    _perturb(model)
    ids = torch.randint(0, 64, (2, 10))
    expected = model(ids).logits.detach()
    merged = merge_adapter(model)
    assert not any(isinstance(m, ExpertLoRA) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_set_adapter_tensors_checks_shapes():
    model = attach_lora(tiny_model(), LoraSettings(r=4, alpha=8))
    tensors = get_adapter_tensors(model)
    with pytest.raises(ValueError, match="expected shape"):
        set_adapter_tensors(model, [torch.zeros(1)] + tensors[1:])
    with pytest.raises(ValueError, match="tensors"):
        set_adapter_tensors(model, tensors[:-1])


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"r": 0}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": ["mlp"]}, "targets"),
        ({"top_layers_fraction": 0}, "top_layers_fraction"),
        ({"rank": 8}, "rank"),
    ],
)
def test_bad_lora_settings_are_refused(bad, field):
    with pytest.raises(ValidationError, match=field):
        LoraSettings(**bad)

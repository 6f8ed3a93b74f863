"""Adapters that load the obvious way: `PeftModel.from_pretrained(base, dir)` on anything fedmoe
writes gives exactly the fine-tuned model, or fails with what to do.

Two things make peft's own loader silently wrong on a fedmoe checkpoint: peft rewrites DeepSeek
targets ending in `gate_proj`/`up_proj`/`down_proj` (our shared-expert LoRA) into routed-expert
parametrizations with fresh factors, and it knows nothing of our routed-expert factors
(expert_lora.safetensors). So:

- a checkpoint with shared- or routed-expert LoRA carries a guard `adapter_config.json` that makes
  peft raise, naming the two ways that work (fedmoe itself reads the settings and weights directly);
- `write_peft_adapter` writes the adapter in peft's own terms: attention LoRA as `target_modules`,
  shared- and routed-expert LoRA as `target_parameters` (peft's parameter LoRA, which the rewrite
  leaves alone; for fused experts its factors are ours, reshaped). The result is loaded back with
  plain peft and compared by logits before it is kept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from fedmoe.model.lora import (
    expert_lora_modules,
    linear_lora_targets,
    peft_conversion_disabled,
    routed_expert_layers,
)
from fedmoe.model.settings import LoraSettings

PEFT_GUARD = {
    "peft_type": (
        "NOT LOADABLE BY PEFT ALONE: this fedmoe checkpoint has expert LoRA that peft would load "
        "wrong. Use fedmoe.model.lora.load_adapter(base, dir), or write a peft adapter with "
        "`fedmoe export --run N --out DIR` and load that with PeftModel.from_pretrained"
    )
}
# Largest logit difference, relative to the largest logit, accepted between the written adapter
# loaded by plain peft and the fine-tuned model (float32 sums in another order).
MAX_RELATIVE_LOGIT_ERROR = 1e-5


def peft_loads_exactly(settings: LoraSettings) -> bool:
    """Whether peft's own loader reads a checkpoint of these settings right: attention LoRA only."""
    return set(settings.targets) == {"attention"}


def write_guard(directory: Path) -> None:
    (directory / "adapter_config.json").write_text(json.dumps(PEFT_GUARD, indent=2))


def _layer(name: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", name).group(1))


def _peft_twin(model: nn.Module, base: nn.Module, settings: LoraSettings) -> nn.Module:
    """`base` with peft's LoRA on the same tensors as `model`, holding `model`'s factors."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    linear = linear_lora_targets(base, settings)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        target_modules=[t for t in linear if ".self_attn." in t] or None,
        target_parameters=[f"{t}.weight" for t in linear if ".shared_experts." in t]
        + [
            f"model.layers.{i}.mlp.experts.{p}"
            for i in routed_expert_layers(base, settings)
            for p in ("gate_up_proj", "down_proj")
        ],
    )
    twin = get_peft_model(base, config)
    ours = dict(model.named_modules())
    experts = expert_lora_modules(model)
    with torch.no_grad():
        for name, module in twin.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            if isinstance(module, ParamWrapper) and module.num_experts > 1:
                if not module._did_swap_in_out_features:  # peft would read [E, in, out]
                    raise ValueError(f"peft reads {name} with another layout than transformers")
                prefix = "gate_up" if module.parameter_name == "gate_up_proj" else "down"
                expert = experts[_layer(name)]
                factor_a, factor_b = (getattr(expert, f"{prefix}_{f}") for f in "AB")
                # peft's rows of A are expert-major (e*r + j), its columns of B rank-major (j*E + e).
                a.copy_(factor_a.reshape(a.shape))
                b.copy_(factor_b.permute(1, 2, 0).reshape(b.shape))
            else:
                source = ours[name.replace(".base_layer", "")]
                a.copy_(source.lora_A["default"].weight)
                b.copy_(source.lora_B["default"].weight)
    return twin


@torch.no_grad()
def write_peft_adapter(
    model: nn.Module, settings: LoraSettings, fresh_base, directory: Path
) -> float:
    """Write `model`'s adapter (fedmoe's LoRA on `fresh_base()`) as a plain peft adapter, check it
    by loading it back with plain peft, and return the relative logit error (the files are removed
    and a ValueError raised if it exceeds MAX_RELATIVE_LOGIT_ERROR)."""
    from peft import PeftModel

    with peft_conversion_disabled():
        twin = _peft_twin(model, fresh_base(), settings)
    twin.save_pretrained(str(directory))
    loaded = PeftModel.from_pretrained(fresh_base(), str(directory)).eval()  # as a user would
    probe = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    expected = model.eval()(probe).logits
    error = ((loaded(probe).logits - expected).abs().max() / expected.abs().max()).item()
    if not error <= MAX_RELATIVE_LOGIT_ERROR:
        for written in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
            (directory / written).unlink(missing_ok=True)
        raise ValueError(
            f"peft loads the exported adapter with logits {error:.1e} (relative) away from the "
            "fine-tuned model; export with --merge instead"
        )
    return error

"""LoRA wiring for DeepSeek-style MoE models.

Three target groups:
- `attention`: the multi-head latent attention projections (peft LoRA on nn.Linear);
- `shared_experts`: the always-on shared expert MLP (peft LoRA on nn.Linear);
- `routed_experts`: the fused routed experts (our `ExpertLoRA`, see expert_lora.py).

peft maps `deepseek_v2/v3` to a MoE conversion table and silently rewrites targets ending in
`gate_proj`/`up_proj`/`down_proj` into routed-expert parameter targets (and drops shared-expert
LoRA on reload). `peft_conversion_disabled()` turns that off around every peft call; the tests
check that exactly the intended modules carry LoRA.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedmoe.model.base import MOE_MODEL_TYPES
from fedmoe.model.expert_lora import ExpertLoRA, is_fused_experts
from fedmoe.model.settings import LoraSettings

ATTENTION_PROJECTIONS = (
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
)
SHARED_EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
EXPERT_LORA_FILE = "expert_lora.safetensors"
EXPERT_LORA_CONFIG_FILE = "expert_lora_config.json"
EXPERT_FACTORS = ("gate_up_A", "gate_up_B", "down_A", "down_B")


@contextlib.contextmanager
def peft_conversion_disabled() -> Iterator[None]:
    """Stop peft from rewriting DeepSeek targets into routed-expert parametrizations."""
    from peft.utils import transformers_weight_conversion as conversion

    saved = {
        t: conversion._MODEL_TO_CONVERSION_PATTERN.pop(t)
        for t in MOE_MODEL_TYPES
        if t in conversion._MODEL_TO_CONVERSION_PATTERN
    }
    try:
        yield
    finally:
        conversion._MODEL_TO_CONVERSION_PATTERN.update(saved)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


def lora_layer_indices(num_layers: int, top_layers_fraction: float) -> list[int]:
    """The top ceil(fraction * L) decoder layers; the lower ones stay frozen."""
    count = max(1, math.ceil(top_layers_fraction * num_layers - 1e-9))
    return list(range(num_layers - count, num_layers))


def linear_lora_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the nn.Linear modules that get peft LoRA."""
    layers = decoder_layers(model)
    targets: list[str] = []
    for i in lora_layer_indices(len(layers), settings.top_layers_fraction):
        prefix = f"model.layers.{i}"
        layer = layers[i]
        if "attention" in settings.targets:
            for name in ATTENTION_PROJECTIONS:
                if isinstance(getattr(layer.self_attn, name, None), nn.Linear):
                    targets.append(f"{prefix}.self_attn.{name}")
        shared = getattr(layer.mlp, "shared_experts", None)
        if "shared_experts" in settings.targets and shared is not None:
            targets += [f"{prefix}.mlp.shared_experts.{n}" for n in SHARED_EXPERT_PROJECTIONS]
    return targets


def routed_expert_layers(model: nn.Module, settings: LoraSettings) -> list[int]:
    """Indices of LoRA layers whose MLP has fused routed experts (the dense first layers have none)."""
    if "routed_experts" not in settings.targets:
        return []
    layers = decoder_layers(model)
    indices = lora_layer_indices(len(layers), settings.top_layers_fraction)
    return [i for i in indices if is_fused_experts(getattr(layers[i].mlp, "experts", nn.Module()))]


def _attach_expert_lora(model: nn.Module, settings: LoraSettings) -> None:
    layers = decoder_layers(model)
    for i in routed_expert_layers(model, settings):
        layers[i].mlp.experts = ExpertLoRA(
            layers[i].mlp.experts, settings.r, settings.alpha, settings.dropout
        )


def attach_lora(base: nn.Module, settings: LoraSettings) -> nn.Module:
    """Freeze `base` and add LoRA to the configured groups; returns the peft model.

    The initial factors depend only on `settings.init_seed`, so every party that builds the
    adapter from the same settings and base gets the same starting point.
    """
    from peft import LoraConfig, get_peft_model

    for p in base.parameters():
        p.requires_grad_(False)
    targets = linear_lora_targets(base, settings)
    if not targets and not routed_expert_layers(base, settings):
        raise ValueError(f"lora.targets={list(settings.targets)} matches no module of this model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.init_seed)
        if targets:
            config = LoraConfig(
                r=settings.r,
                lora_alpha=settings.alpha,
                lora_dropout=settings.dropout,
                target_modules=targets,
            )
            with peft_conversion_disabled():
                model = get_peft_model(base, config)
        else:
            model = base
        _attach_expert_lora(model, settings)
    return model


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable adapter tensors by name, in the canonical (sorted) order used on the wire."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return dict(sorted(params.items()))


def adapter_layout(model: nn.Module) -> str:
    """Hash of the adapter's names and shapes: both sides must agree before arrays travel."""
    h = hashlib.sha256()
    for name, p in adapter_parameters(model).items():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def get_adapter_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in adapter_parameters(model).values()]


@torch.no_grad()
def set_adapter_tensors(model: nn.Module, tensors: list[torch.Tensor]) -> None:
    params = adapter_parameters(model)
    if len(tensors) != len(params):
        raise ValueError(f"adapter has {len(params)} tensors, got {len(tensors)}")
    for (name, p), t in zip(params.items(), tensors, strict=True):
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(
                f"adapter tensor {name}: expected shape {tuple(p.shape)}, got {tuple(t.shape)}"
            )
        p.copy_(t.to(device=p.device, dtype=p.dtype))


def get_adapter_vector(model: nn.Module) -> np.ndarray:
    """The adapter as ONE float32 vector, tensors in the canonical order: what travels each round.
    Flower moves every array of a message as its own object (one HTTP request each, several hops):
    one vector instead of ~100 tensors takes seconds off every message of a round."""
    return torch.cat(
        [p.detach().float().reshape(-1).cpu() for p in adapter_parameters(model).values()]
    ).numpy()


def expert_slots(model: nn.Module) -> tuple[np.ndarray, list[int]]:
    """(for each element of the adapter vector, its routed-expert slot or -1; the layers in slot
    order): slot j * E + e is expert e of the j-th layer with expert LoRA."""
    modules = expert_lora_modules(model)
    layers = sorted(modules)
    slot_of_factor = {}
    for j, layer in enumerate(layers):
        for factor in modules[layer].factors():
            slot_of_factor[id(factor)] = j * factor.shape[0]
    pieces = []
    for p in adapter_parameters(model).values():
        if id(p) in slot_of_factor:  # [E, ...]: expert e's values are the e-th contiguous block
            experts = p.shape[0]
            slots = slot_of_factor[id(p)] + np.arange(experts, dtype=np.int64)
            pieces.append(np.repeat(slots, p.numel() // experts))
        else:
            pieces.append(np.full(p.numel(), -1, dtype=np.int64))
    return np.concatenate(pieces), layers


@torch.no_grad()
def set_adapter_vector(model: nn.Module, vector: np.ndarray) -> None:
    params = adapter_parameters(model)
    size = sum(p.numel() for p in params.values())
    if vector.ndim != 1 or vector.size != size:
        raise ValueError(
            f"the adapter has {size} values, got an array of shape {tuple(vector.shape)}"
        )
    offset = 0
    for p in params.values():
        chunk = torch.from_numpy(np.ascontiguousarray(vector[offset : offset + p.numel()]))
        p.copy_(chunk.view(p.shape).to(device=p.device, dtype=p.dtype))
        offset += p.numel()


def expert_lora_modules(model: nn.Module) -> dict[int, ExpertLoRA]:
    return {
        i: layer.mlp.experts
        for i, layer in enumerate(decoder_layers(model))
        if isinstance(getattr(layer.mlp, "experts", None), ExpertLoRA)
    }


def save_adapter(model: nn.Module, settings: LoraSettings, directory: Path) -> None:
    """The Linear LoRA in peft's files, our expert factors, and the settings that built both.

    expert_lora.safetensors holds `model.layers.{i}.mlp.experts.{gate_up_A,gate_up_B,down_A,down_B}`;
    expert_lora_config.json holds the LoraSettings. peft's adapter_config.json is a guard that makes
    `PeftModel.from_pretrained` fail where it would load the adapter wrong (model/peft_format.py).
    """
    from fedmoe.model.peft_format import peft_loads_exactly, write_guard

    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        with peft_conversion_disabled():
            model.save_pretrained(str(directory))
    tensors = {}
    for i, module in expert_lora_modules(model).items():
        for name in EXPERT_FACTORS:
            tensors[f"model.layers.{i}.mlp.experts.{name}"] = (
                getattr(module, name).detach().cpu().contiguous()
            )
    if tensors:
        save_file(tensors, str(directory / EXPERT_LORA_FILE))
    if not peft_loads_exactly(settings):
        write_guard(directory)
    (directory / EXPERT_LORA_CONFIG_FILE).write_text(settings.model_dump_json(indent=2))


def _load_expert_factors(model: nn.Module, directory: Path) -> None:
    modules = expert_lora_modules(model)
    if not modules:
        return
    tensors = load_file(str(directory / EXPERT_LORA_FILE))
    expected = {f"model.layers.{i}.mlp.experts.{n}" for i in modules for n in EXPERT_FACTORS}
    if set(tensors) != expected:
        raise ValueError(
            f"{EXPERT_LORA_FILE} does not match the model: missing {sorted(expected - set(tensors))[:3]}, "
            f"unexpected {sorted(set(tensors) - expected)[:3]}"
        )
    with torch.no_grad():
        for i, module in modules.items():
            for n in EXPERT_FACTORS:
                getattr(module, n).copy_(tensors[f"model.layers.{i}.mlp.experts.{n}"])


def adapter_settings(directory: Path) -> LoraSettings:
    config_path = directory / EXPERT_LORA_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a fedmoe adapter: {EXPERT_LORA_CONFIG_FILE} is missing"
        )
    return LoraSettings.model_validate_json(config_path.read_text())


def load_adapter(base: nn.Module, directory: Path) -> nn.Module:
    """Base model + the adapter saved by `save_adapter`: its settings rebuild the adapter, its
    weights fill it (peft's loader is not used: it would rewrite the shared-expert targets)."""
    directory = Path(directory)
    model = attach_lora(base, adapter_settings(directory))
    load_adapter_weights(model, directory)
    return model


def load_adapter_weights(model: nn.Module, directory: Path) -> None:
    """Load an adapter saved by `save_adapter` into `model`, already adapted with the same settings
    (a resumed coordinator reading its last checkpoint); every adapter tensor must be there."""
    from peft import set_peft_model_state_dict

    directory = Path(directory)
    settings = adapter_settings(directory)
    if hasattr(model, "peft_config"):
        state = load_file(str(directory / "adapter_model.safetensors"))
        with peft_conversion_disabled():
            result = set_peft_model_state_dict(model, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{directory} does not match the model's adapter ({settings.r=}): "
                f"missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}"
            )
    _load_expert_factors(model, directory)


def merge_adapter(model: nn.Module) -> nn.Module:
    """A plain transformers model with every LoRA product folded into the base weights."""
    layers = decoder_layers(model)
    for i, module in expert_lora_modules(model).items():
        layers[i].mlp.experts = module.merged_base()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model


def adapter_size(model_path: str, settings: LoraSettings) -> int:
    """Trainable adapter parameters of `settings` on a checkpoint, counted on the meta device
    (shapes only: no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedmoe.model.base import resolve_model_path

    config = AutoConfig.from_pretrained(str(resolve_model_path(model_path)), local_files_only=True)
    with torch.device("meta"):
        model = attach_lora(AutoModelForCausalLM.from_config(config), settings)
    return sum(p.numel() for p in adapter_parameters(model).values())

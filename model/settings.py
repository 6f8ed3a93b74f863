"""LoRA settings (which groups of a DeepSeek-style MoE get adapters, how large) and how the base loads.

A light module (pydantic only) because both sides read it and the node's per-message ClientApp
must stay free of torch. Validated once, at the edge; strict so that `alpha = true` or
`r = 4.5` is an error, not a coercion.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TargetGroup = Literal["attention", "shared_experts", "routed_experts"]


class LoraSettings(BaseModel):
    """LoRA hyperparameters, shared by coordinator and clients."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(
        32.0, ge=1e-3, le=1e6, description="LoRA alpha; the update is scaled by alpha/r"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    targets: tuple[TargetGroup, ...] = Field(
        ("attention", "shared_experts", "routed_experts"), min_length=1, strict=False
    )
    top_layers_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="fraction of decoder layers, counted from the top, that get LoRA",
    )
    init_seed: int = Field(0, ge=0, lt=2**63, description="seed of the initial (global) adapter")

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate target groups in {list(v)}")
        return v


class BaseLoading(BaseModel):
    """How every party loads the frozen base. Part of each round's contract: the fingerprint of
    what was loaded (dtype and quantized weights included) proves that every node trains the same
    base."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="the base weights' dtype; \"auto\" keeps the checkpoint's own"
    )
    quantize: Literal["none", "int8", "nf4"] = Field(
        "none",
        description="the routed experts (most of a MoE's weights) stored as int8 (one scale per "
        "row) or NF4 (4 bits, one scale per 64 weights), on any device; LoRA stays in float32",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, more time"
    )

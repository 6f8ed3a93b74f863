"""The base MoE model: the embedded default's architecture, loading from a local path, fingerprint.

Weights and tokenizer always come from a local directory (`local_files_only=True`): nothing is
ever fetched from a model hub. torch is imported where a model is built: checking a run config
(`check_model_dir`) must not pay seconds of imports before it can refuse one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

EMBEDDED_BASE_DIR = Path(__file__).parent / "assets" / "base"
EMBEDDED = "embedded"

# The embedded default: a ~2.2M-parameter DeepSeek-V3 (MLA attention, 1 dense layer then MoE
# layers with 8 routed experts, top-2 sigmoid routing with group limits, 1 shared expert).
EMBEDDED_ARCHITECTURE = dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=32,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


MOE_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# A checkpoint's config.json is a few KB; one this large is not one, and is not read whole.
MAX_MODEL_CONFIG_BYTES = 1 << 24


def resolve_model_path(path: str | Path) -> Path:
    return EMBEDDED_BASE_DIR if str(path) == EMBEDDED else Path(path).expanduser().resolve()


def check_model_dir(directory: Path) -> dict:
    """The checkpoint's config, if `directory` holds a DeepSeek-style MoE with weights; otherwise a
    ValueError / FileNotFoundError that says what is missing (nothing is loaded)."""
    hint = (
        " (run `fedmoe pretrain` to rebuild the embedded base)"
        if directory == EMBEDDED_BASE_DIR
        else ""
    )
    config_file = directory / "config.json"
    try:
        found = config_file.is_file()
    except OSError as err:  # e.g. a name too long for the file system
        raise ValueError(
            f"cannot read the checkpoint in {str(directory)[:200]}: {err.strerror}"
        ) from None
    if not found:
        raise FileNotFoundError(f"no config.json in {directory}{hint}")
    try:
        if config_file.stat().st_size > MAX_MODEL_CONFIG_BYTES:
            raise ValueError(f"config.json is larger than {MAX_MODEL_CONFIG_BYTES:,} bytes")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        has_weights = any(
            p.is_file() for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern)
        )
    except RecursionError:
        raise ValueError(
            f"cannot read the checkpoint in {str(directory)[:200]}: config.json nests too deeply"
        ) from None
    except (
        OSError,
        ValueError,
    ) as err:  # ValueError: not UTF-8, not JSON, an integer too long for Python
        problem = str(err).split("; use ")[0]  # Python's hint for long integers is for programmers
        raise ValueError(
            f"cannot read the checkpoint in {str(directory)[:200]}: {problem}"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a model config")
    model_type = config.get("model_type")
    if model_type not in MOE_MODEL_TYPES:
        raise ValueError(
            f"{directory} holds a {model_type!r} model; fedmoe fine-tunes DeepSeek-style MoE models ({', '.join(MOE_MODEL_TYPES)})"
        )
    if not has_weights:
        raise FileNotFoundError(
            f"no weights (*.safetensors or pytorch_model*.bin) in {directory}{hint}"
        )
    return config


def load_base(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """A causal-LM MoE checkpoint from a local directory, frozen, in eval mode (`dtype`: float32 if None)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fedmoe.model.expert_lora import is_fused_experts

    directory = resolve_model_path(path)
    check_model_dir(directory)
    dtype = torch.float32 if dtype is None else dtype
    model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
    if not any(is_fused_experts(m) for m in model.modules()):
        raise ValueError(
            f"model.path: {directory} holds a {model.config.model_type} model without routed experts; fedmoe fine-tunes MoE models"
        )
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(path)), local_files_only=True)


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over the base weights (names, dtypes, shapes, bytes), independent of file layout."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())

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

from fedmoe.model.settings import BaseLoading

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
    path: str | Path, loading: BaseLoading | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """A causal-LM MoE checkpoint from a local directory, loaded as `loading` says (float32 by
    default), frozen, in eval mode, on `device` if it fits there."""
    import torch
    from transformers import AutoModelForCausalLM

    from fedmoe.model.expert_lora import is_fused_experts
    from fedmoe.model.quantize import quantize_experts

    loading = loading or BaseLoading()
    directory = resolve_model_path(path)
    config = check_model_dir(directory)
    dtype = load_dtype(config, loading)
    check_fits(directory, loading, torch.device(device))
    model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
    if not any(is_fused_experts(m) for m in model.modules()):
        raise ValueError(
            f"model.path: {directory} holds a {model.config.model_type} model without routed experts; fedmoe fine-tunes MoE models"
        )
    if loading.quantize != "none":
        quantize_experts(model, loading.quantize)
    if loading.gradient_checkpointing:
        # Non-reentrant: recomputation runs under the per-example gradient rules (privacy/).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_dtype(config: dict, loading: BaseLoading) -> torch.dtype:
    import torch

    if loading.dtype != "auto":
        return getattr(torch, loading.dtype)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f'model.dtype = "auto": the checkpoint\'s dtype {name!r} is not supported')
    return getattr(torch, name)


def base_bytes(directory: Path, loading: BaseLoading) -> int:
    """Bytes the base takes in memory when loaded as `loading` says (counted on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedmoe.model.expert_lora import is_fused_experts
    from fedmoe.model.quantize import quantized_bytes

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    element = torch.empty(0, dtype=load_dtype(config.to_dict(), loading)).element_size()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters()) * element
    if loading.quantize != "none":
        for m in model.modules():
            if is_fused_experts(m):
                for w in (m.gate_up_proj, m.down_proj):
                    total += quantized_bytes(w.shape, loading.quantize, element)
                    total -= w.numel() * element
    return total


def free_bytes(device: torch.device) -> int:
    import os

    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what can be had without swapping, page cache included
        meminfo = Path("/proc/meminfo").read_text()
        return int(meminfo.split("MemAvailable:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(directory: Path, loading: BaseLoading, device: torch.device) -> None:
    """Refuse, before loading, a base whose weights alone exceed `device`'s free memory, saying what
    it needs. One device per node: a base that needs several GPUs is refused (placing it across a
    node's GPUs with device_map is not supported yet)."""
    needed, free = base_bytes(directory, loading), free_bytes(device)
    if needed > free:
        hint = ' or quantize = "nf4"' if loading.quantize != "nf4" else ""
        raise ValueError(
            f"model: the base in {directory.name} needs {_size(needed)} as loaded (dtype "
            f"{loading.dtype}, quantize {loading.quantize}); {device} has {_size(free)} free. "
            f'Use a device with more memory, dtype = "bfloat16"{hint}'
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


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

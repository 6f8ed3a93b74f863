"""Rebuild the embedded base model: tokenizer + DeepSeek-V3 weights, trained on our own corpus.

`fedmoe pretrain` runs this. The pretraining corpus is mostly the general domain, with a small
share of each enterprise domain, so the federated fine-tune has something left to learn.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedmoe.model.base import EMBEDDED_ARCHITECTURE
from fedmoe.model.corpus import DEMO_ENTERPRISES, generate
from fedmoe.model.data import record_text, tokenize_blocks

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"]


def pretraining_texts(seed: int = 7, general: int = 6000, per_domain: int = 150) -> list[str]:
    records = generate("general", general, seed=seed)
    for domain in DEMO_ENTERPRISES:
        records += generate(domain, per_domain, seed=seed + 100)
    return [record_text(r, "corpus") for r in records]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


def pretrain(
    out_dir: Path,
    steps: int = 1500,
    batch_size: int = 16,
    seq_len: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> None:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    texts = pretraining_texts()
    tokenizer = train_tokenizer(texts, EMBEDDED_ARCHITECTURE["vocab_size"])
    config = DeepseekV3Config(
        **EMBEDDED_ARCHITECTURE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = DeepseekV3ForCausalLM(config)
    blocks = tokenize_blocks(texts, tokenizer, seq_len)
    log(
        f"pretraining {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {blocks.shape[0]} blocks of {seq_len} tokens"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.time()
    for step in range(1, steps + 1):
        # Cosine decay with a short warmup.
        warm = min(1.0, step / 50)
        for group in optimizer.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = blocks[torch.randint(0, blocks.shape[0], (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps:
            log(f"step {step}/{steps}  loss {loss.item():.3f}  {time.time() - start:.0f}s")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    log(f"saved the base model and tokenizer to {out_dir}")

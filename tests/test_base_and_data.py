"""Loading a local checkpoint, the base fingerprint, data files and the non-IID partitioner."""

import json

import pytest
import torch
from conftest import tiny_model

from fedmoe.model.base import fingerprint, load_base, load_tokenizer
from fedmoe.model.data import dirichlet_partition, find_split, read_texts, tokenize_blocks


def test_local_checkpoint_loads_without_any_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_model()
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = load_base(tmp_path / "ckpt")
    assert loaded.config.model_type == "deepseek_v3"
    assert fingerprint(loaded) == fingerprint(model)
    assert not any(p.requires_grad for p in loaded.parameters())
    ids = torch.randint(0, 64, (1, 6))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_embedded_base_and_tokenizer_load(embedded_base_path):
    model = load_base("embedded")
    tok = load_tokenizer("embedded")
    assert model.config.model_type == "deepseek_v3" and model.config.n_routed_experts == 8
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 5e6
    assert tok.decode(tok("Risk note: Alder Capital")["input_ids"]) == "Risk note: Alder Capital"


def test_fingerprint_detects_a_changed_weight():
    a, b = tiny_model(), tiny_model()
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.experts.down_proj[0, 0, 0] += 1e-3
    assert fingerprint(a) != fingerprint(b)


def test_missing_or_non_moe_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_base(tmp_path / "nothing")
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    ).save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(
        ValueError, match="holds a 'llama' model; fedmoe fine-tunes DeepSeek-style MoE models"
    ):
        load_base(tmp_path / "llama")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text('{"model_type": "deepseek_v3"}')
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_base(weightless)


def test_jsonl_csv_and_instruction_records(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"text": "hello"})
        + "\n"
        + json.dumps({"instruction": "Q?", "response": "A."})
        + "\n"
    )
    assert read_texts(tmp_path / "train.jsonl") == [
        "hello",
        "### Instruction:\nQ?\n### Response:\nA.",
    ]
    (tmp_path / "heldout.csv").write_text("text\nfirst row\nsecond row\n")
    assert read_texts(find_split(tmp_path, "heldout")) == ["first row", "second row"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="'text' field"):
        read_texts(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1"):
        read_texts(tmp_path / "broken.jsonl")
    with pytest.raises(FileNotFoundError, match="no train"):
        find_split(tmp_path / "missing", "train")


def test_blocks_have_fixed_length():
    tok = load_tokenizer("embedded")
    blocks = tokenize_blocks(["a short text"] * 50, tok, seq_len=16)
    assert blocks.shape[1] == 16 and blocks.shape[0] >= 10
    assert (blocks == tok.eos_token_id).any()


def test_dirichlet_partition_is_complete_disjoint_and_skewed():
    labels = ["a"] * 300 + ["b"] * 300 + ["c"] * 300
    parts = dirichlet_partition(labels, num_clients=3, alpha=0.1, seed=0)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(900))
    assert parts == dirichlet_partition(labels, num_clients=3, alpha=0.1, seed=0)

    # Small alpha: most clients are dominated by one label; large alpha: close to uniform.
    def top_share(part):
        counts = [sum(labels[i] == label for i in part) for label in "abc"]
        return max(counts) / max(1, sum(counts))

    skewed = [top_share(p) for p in parts if p]
    uniform = [top_share(p) for p in dirichlet_partition(labels, 3, alpha=1000.0, seed=0)]
    assert sum(skewed) / len(skewed) > 0.6 and max(uniform) < 0.45
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(labels, 3, alpha=0)

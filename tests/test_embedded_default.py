"""The shipped embedded default is reproducible by our own scripts."""

import filecmp

from fedmoe.model.base import load_base, load_tokenizer
from fedmoe.model.corpus import DEMO_DATA_DIR, DEMO_ENTERPRISES, build_demo_federation
from fedmoe.model.pretrain import pretrain


def test_demo_data_is_regenerated_byte_for_byte(tmp_path):
    build_demo_federation(tmp_path)
    for domain in DEMO_ENTERPRISES:
        for split in ("train", "heldout"):
            assert filecmp.cmp(
                tmp_path / domain / f"{split}.jsonl",
                DEMO_DATA_DIR / domain / f"{split}.jsonl",
                shallow=False,
            )
    assert filecmp.cmp(
        tmp_path / "public_eval.jsonl", DEMO_DATA_DIR / "public_eval.jsonl", shallow=False
    )


def test_pretrain_script_builds_a_loadable_base(tmp_path):
    pretrain(tmp_path / "base", steps=3, batch_size=2, log=lambda _: None)
    model = load_base(tmp_path / "base")
    shipped = load_base("embedded")
    assert model.config.to_dict()["n_routed_experts"] == shipped.config.n_routed_experts
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in shipped.named_parameters()]
    # The tokenizer is trained on the same corpus: identical vocabulary.
    assert load_tokenizer(tmp_path / "base").get_vocab() == load_tokenizer("embedded").get_vocab()
    assert sum(f.stat().st_size for f in (tmp_path / "base").iterdir()) < 20e6

"""Using a run's result: find its adapter, generate text with it, export a merged model."""

from __future__ import annotations

from pathlib import Path

import torch

from fedmoe.coordinator.store.db import Round, RunStore
from fedmoe.coordinator.store.outcome import outcome
from fedmoe.model.base import load_base, load_tokenizer
from fedmoe.model.lora import adapter_settings, load_adapter, merge_adapter
from fedmoe.model.peft_format import write_peft_adapter


def resolve_adapter(
    store: RunStore, run_id: int, round_number: int | None = None
) -> tuple[Round | None, str, str]:
    """(the committed round whose checkpoint is meant, base model path, note) for a run's given
    round, or for its result (store/outcome.py): the round that did best on the run's server
    evaluation, else on the enterprises' own held-out loss, else the last completed round. The
    round is None when no round beat the base model: the base model is the run's result, and the
    note says so."""
    run = store.run(run_id)
    if run is None:
        raise LookupError(f"run {run_id} not found; `fedmoe runs` lists the runs")
    rounds = [r for r in store.rounds(run_id) if r.status == "completed" and r.checkpoint_path]
    model_path = run.config["model"]["path"]
    if round_number is None and (result := outcome(rounds, run.base_eval_loss)) is not None:
        if result.best_round is None:
            return None, model_path, result.describe()
        round_number = result.best_round
    if round_number is not None:
        rounds = [r for r in rounds if r.number == round_number]
    if not rounds:
        which = f"round {round_number}" if round_number is not None else "any round"
        raise LookupError(f"run {run_id} has no completed checkpoint for {which}")
    return rounds[-1], model_path, ""


def adapter_of_run(
    store: RunStore, run_id: int, round_number: int | None = None
) -> tuple[Path | None, str]:
    """(checkpoint dir, base model path) as `resolve_adapter` finds them; None: the base model."""
    found, model_path, note = resolve_adapter(store, run_id, round_number)
    if found is None:
        print(f"run {run_id}: {note}; --round N takes a round anyway")
        return None, model_path
    return Path(found.checkpoint_path), model_path


def load_adapted(model_path: str, adapter_dir: Path | None) -> torch.nn.Module:
    base = load_base(model_path)
    return base if adapter_dir is None else load_adapter(base, adapter_dir).eval()


@torch.no_grad()
def generate(
    model_path: str,
    adapter_dir: Path | None,
    prompt: str,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    tokenizer = load_tokenizer(model_path)
    model = load_adapted(model_path, adapter_dir)
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    sampling = (
        dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    )
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def export(model_path: str, adapter_dir: Path, out_dir: Path, merge: bool) -> None:
    """Merged: a standalone transformers checkpoint with the adapter folded in. Not merged: a plain
    peft adapter (`PeftModel.from_pretrained(base, out_dir)`), checked by logits."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"--out {out_dir} is not empty; choose a new folder")
    if not merge:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_peft_adapter(
            load_adapted(model_path, adapter_dir),
            adapter_settings(adapter_dir),
            lambda: load_base(model_path),
            out_dir,
        )
        return
    merged = merge_adapter(load_adapted(model_path, adapter_dir))
    merged.save_pretrained(str(out_dir))
    load_tokenizer(model_path).save_pretrained(str(out_dir))

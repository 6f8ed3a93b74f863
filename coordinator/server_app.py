"""Flower ServerApp: the coordinator's side of a federated run.

Runs the legacy `DefaultWorkflow` (the path that SecAgg+ plugs into) with the `FederatedLoRA`
strategy. The coordinator holds its own copy of the public base model to build the initial
adapter, evaluate on a held-out set and write checkpoints; it never receives base weights or
records from a node, only adapter deltas.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.common import GetPropertiesIns, MessageTypeLegacy
from flwr.compat.common import recorddict_compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from fedmoe.client.trainer import evaluate_loss
from fedmoe.coordinator.config import RunConfig, run_config_from_json
from fedmoe.coordinator.db import RoundRecord, RunStore
from fedmoe.coordinator.strategy import AskNodes, BudgetExhausted, FederatedLoRA, RoundContext
from fedmoe.model.base import fingerprint, load_base, load_tokenizer
from fedmoe.model.data import load_blocks
from fedmoe.model.lora import adapter_layout, attach_lora, get_adapter_tensors, save_adapter, set_adapter_tensors
from fedmoe.privacy.plan import plan_enterprise_level

log = logging.getLogger("fedmoe")


def directory_sha256(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.relative_to(directory).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def run_dir(config: RunConfig, run_id: int) -> Path:
    return Path(config.output.dir) / f"run-{run_id:04d}"


def grid_asker(grid: Grid, timeout: float) -> AskNodes:
    """The budget handshake over Flower: one legacy get_properties message to every node at once."""

    def ask(node_ids: list[int], config: dict) -> dict[int, dict | str]:
        content = recorddict_compat.getpropertiesins_to_recorddict(GetPropertiesIns(config))
        messages = [Message(content=content, message_type=MessageTypeLegacy.GET_PROPERTIES, dst_node_id=n, ttl=timeout) for n in node_ids]
        answers: dict[int, dict | str] = {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                answers[node] = reply.error.reason
            else:
                answers[node] = dict(recorddict_compat.recorddict_to_getpropertiesres(reply.content).properties)
        return answers

    return ask


def build_round_context(config: RunConfig, checkpoint_root: Path, ask_nodes: AskNodes) -> RoundContext:
    """Base model, initial adapter, checkpoint writer and server-side evaluation."""
    base = load_base(config.model.path)
    base_fp = fingerprint(base)
    model = attach_lora(base, config.lora)

    def save_checkpoint(server_round: int, adapter: list[np.ndarray]) -> tuple[str, str]:
        set_adapter_tensors(model, [torch.from_numpy(a) for a in adapter])
        directory = checkpoint_root / f"round-{server_round:03d}"
        save_adapter(model, config.lora, directory)
        return str(directory), directory_sha256(directory)

    server_eval = None
    if config.evaluation.server_data:
        blocks = load_blocks(Path(config.evaluation.server_data), load_tokenizer(config.model.path), config.train.seq_len)

        def server_eval(adapter: list[np.ndarray]) -> float:
            set_adapter_tensors(model, [torch.from_numpy(a) for a in adapter])
            return evaluate_loss(model, blocks, config.train.eval_batch_size, torch.device("cpu"))

    return RoundContext(
        base_fingerprint=base_fp,
        adapter_layout=adapter_layout(model),
        initial_adapter=[t.numpy() for t in get_adapter_tensors(model)],
        save_checkpoint=save_checkpoint,
        ask_nodes=ask_nodes,
        server_eval=server_eval,
    )


def privacy_plan_summary(config: RunConfig) -> dict:
    """What the run promises, for the database and the first progress line."""
    privacy = config.privacy
    summary: dict = {"secure_aggregation": config.federation.secure_aggregation.enabled}
    if privacy.record:
        summary["record"] = privacy.record.model_dump()
    if privacy.enterprise:
        plan = plan_enterprise_level(privacy.enterprise, config.federation.rounds)
        summary["enterprise"] = {**privacy.enterprise.model_dump(), "noise_multiplier": plan.noise_multiplier}
    return summary


def describe_privacy(config: RunConfig) -> str:
    privacy, parts = config.privacy, []
    if privacy.record:
        r = privacy.record
        parts.append(f"record-level DP-SGD eps {r.epsilon:g} delta {r.delta:g} clip {r.clip:g} ({r.accountant})")
    if privacy.enterprise:
        e = privacy.enterprise
        plan = plan_enterprise_level(e, config.federation.rounds)
        delta = f" delta {e.delta:g}" if e.mechanism == "gaussian" else ""
        parts.append(f"enterprise-level {e.mechanism} eps {e.epsilon:g}{delta} clip {e.clip:g} noise x{plan.noise_multiplier:.3g}")
    if not parts:
        return "privacy OFF: this run makes no differential-privacy claim"
    secagg = "on" if config.federation.secure_aggregation.enabled else "off"
    return "privacy: " + "; ".join(parts) + f"; secure aggregation {secagg}"


def format_round(record: RoundRecord, config: RunConfig) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    ok = sum(p.status == "ok" for p in record.participations)
    seconds = (record.ended_at - record.started_at).total_seconds()
    line = (
        f"[fedmoe] round {record.number}/{config.federation.rounds} | clients {ok}/{len(config.federation.enterprises)} "
        f"| train loss {fmt(record.train_loss)} | eval loss {fmt(record.eval_loss)} | server eval {fmt(record.server_eval_loss)}"
    )
    for level in ("record", "enterprise"):
        settings = getattr(config.privacy, level)
        spent = [getattr(p, f"epsilon_{level}") for p in record.participations if getattr(p, f"epsilon_{level}") is not None]
        if settings is not None and spent:
            line += f" | eps {level} {max(spent):.3f}/{settings.epsilon:g}"
    refused = sum(p.status == "refused" for p in record.participations)
    return line + (f" | refused {refused}" if refused else "") + f" | {seconds:.1f}s"


def run_federation(grid: Grid, context: Context, config: RunConfig) -> int:
    """Run all rounds; returns the run id. The run row ends as completed or failed, never running."""
    torch.set_num_threads(max(1, config.federation.threads_per_client))
    store = RunStore(config.database.url)
    # The run row exists before the model loads so that a failure there is recorded too.
    run_id = store.create_run(config.to_toml_dict(), planned_rounds=config.federation.rounds)
    n = len(config.federation.enterprises)
    secagg = config.federation.secure_aggregation
    try:
        store.set_privacy_plan(run_id, privacy_plan_summary(config))
        ctx = build_round_context(config, run_dir(config, run_id), grid_asker(grid, secagg.timeout_s))
        store.set_fingerprint(run_id, ctx.base_fingerprint)
        print(f"[fedmoe] run {run_id}: {n} enterprises, {config.federation.rounds} rounds, base {ctx.base_fingerprint[:12]}", flush=True)
        print(f"[fedmoe] {describe_privacy(config)}", flush=True)
        if ctx.server_eval is not None:
            print(f"[fedmoe] base model server eval loss {ctx.server_eval(ctx.initial_adapter):.4f}", flush=True)
        strategy = FederatedLoRA(config, ctx, store, run_id, on_round=lambda r: print(format_round(r, config), flush=True))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=config.federation.rounds), strategy=strategy)
        fit_workflow = None
        if secagg.enabled:
            fit_workflow = SecAggPlusWorkflow(
                num_shares=1.0,  # every client holds shares of every other's masks
                reconstruction_threshold=secagg.reconstruction_threshold,
                max_weight=1.0,  # clients send weight 1: the coordinator gets the plain average
                clipping_range=secagg.value_range_for(config.privacy, config.federation.rounds),
                quantization_range=1 << secagg.quantization_bits,
                modulus_range=1 << 32,
                timeout=secagg.timeout_s,
            )
        try:
            DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        except BudgetExhausted as spent:
            store.finish_run(run_id, "budget_spent", str(spent))
            print(f"[fedmoe] run {run_id} stopped: privacy budgets are spent ({spent})", flush=True)
            return run_id
        strategy.flush()
    except BaseException as err:
        store.finish_run(run_id, "failed", f"{type(err).__name__}: {err}")
        print(f"[fedmoe] run {run_id} failed: {err}", flush=True)
        raise
    else:
        store.finish_run(run_id, "completed")
        print(f"[fedmoe] run {run_id} completed; adapter checkpoints in {run_dir(config, run_id)}", flush=True)
    finally:
        store.close()
    return run_id


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config_path = str(context.run_config.get("config-path", ""))
    if not config_path:
        raise ValueError("run config key 'config-path' is empty: start runs with `fedmoe run`")
    run_federation(grid, context, run_config_from_json(Path(config_path).read_text()))

"""Flower ServerApp: the coordinator's side of a federated run.

Runs the legacy `DefaultWorkflow` (the path that SecAgg+ plugs into) with the `FederatedLoRA`
strategy. The coordinator holds its own copy of the public base model to build the initial
adapter, evaluate on a held-out set and write checkpoints; it never receives base weights or
records from a node, only adapter deltas.

The run row exists before the ServerApp starts (the launcher or the coordinator service made it).
A ServerApp that finds rounds already committed resumes after the last one, from its checkpoint.
Every way out of `run_federation` writes a final status, except a kill: then the supervisor that
started this Flower run sees it end with the row still `running` and resumes or fails it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.common import GetPropertiesIns, MessageTypeLegacy
from flwr.compat.common import recorddict_compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from fedmoe.contract.expert_weighting import weighting_of_layout
from fedmoe.coordinator.config import RunConfig, parse_run_config
from fedmoe.coordinator.round.flower_run import LOG_END, FlowerRun
from fedmoe.coordinator.round.grid import FleetGrid
from fedmoe.coordinator.round.secure_sum import SecureSumWorkflow
from fedmoe.coordinator.round.strategy import (
    AskNodes,
    BudgetExhausted,
    FederatedLoRA,
    RoundContext,
    evaluates_with_training,
)
from fedmoe.coordinator.round.tracking import RunFeed, open_trackers
from fedmoe.coordinator.store.db import FINAL_STATUSES, Round, RoundRecord, RunStore
from fedmoe.coordinator.store.outcome import NO_EVALUATION, outcome
from fedmoe.coordinator.store.run_folders import claim_run_dir, folder_owner_problem, run_dir
from fedmoe.coordinator.store.views import describe_privacy
from fedmoe.model.base import fingerprint, load_base, load_tokenizer
from fedmoe.model.data import load_records
from fedmoe.model.lora import (
    adapter_layout,
    attach_lora,
    expert_slots,
    get_adapter_tensors,
    get_adapter_vector,
    load_adapter_weights,
    save_adapter,
    set_adapter_vector,
)
from fedmoe.model.loss import evaluate_loss
from fedmoe.privacy import secagg_prg
from fedmoe.support.files import unwritable
from fedmoe.support.words import plural

log = logging.getLogger("fedmoe")


def directory_sha256(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.relative_to(directory).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def write_atomically(directory: Path, write) -> None:
    """Write a checkpoint folder in a temporary sibling, fsync it, then rename it into place: a
    crash or a full disk never leaves a half-written folder under the final name."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(staging)
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if directory.exists():  # a round an earlier attempt wrote but never committed
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def grid_asker(grid: Grid, timeout: float) -> AskNodes:
    """The budget handshake over Flower: one legacy get_properties message to every node at once."""

    def ask(node_ids: list[int], config: dict) -> dict[int, dict | str]:
        content = recorddict_compat.getpropertiesins_to_recorddict(GetPropertiesIns(config))
        messages = [
            Message(
                content=content,
                message_type=MessageTypeLegacy.GET_PROPERTIES,
                dst_node_id=n,
                ttl=timeout,
            )
            for n in node_ids
        ]
        answers: dict[int, dict | str] = {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                answers[node] = reply.error.reason
            else:
                answers[node] = dict(
                    recorddict_compat.recorddict_to_getpropertiesres(reply.content).properties
                )
        return answers

    return ask


def build_round_context(
    config: RunConfig, store: RunStore, run_id: int, run_uid: str, ask_nodes: AskNodes
) -> RoundContext:
    """Base model, initial adapter (or the last checkpoint of a resumed run), checkpoint writer
    and server-side evaluation."""
    base = load_base(config.model.path, config.model.loading)
    base_fp = fingerprint(base)
    model = attach_lora(base, config.lora)
    checkpoint_root = run_dir(config.output.dir, run_id)
    first_round, resume_note = 1, None
    if (last := store.last_round(run_id)) is not None:
        first_round = last.number + 1
        committed = [
            r for r in store.rounds(run_id) if r.status == "completed" and r.checkpoint_path
        ]
        resume_note = resume_from_intact(model, committed)
    if unwritable(checkpoint_root) is None:  # when it is not, the round check says so
        claim_run_dir(checkpoint_root, run_uid, resumed=first_round > 1)

    def save_checkpoint(number: int, adapter: list[np.ndarray]) -> tuple[str, str]:
        set_adapter_vector(model, adapter[0])
        directory = checkpoint_root / f"round-{number:03d}"
        write_atomically(directory, lambda staging: save_adapter(model, config.lora, staging))
        return str(directory), directory_sha256(directory)

    adapter_bytes = get_adapter_vector(model).nbytes

    def storage_problem() -> str | None:
        """Why a checkpoint could not be written now: the folder, and room for two of them."""
        return unwritable(checkpoint_root, 2 * adapter_bytes + (16 << 20)) or (
            folder_owner_problem(checkpoint_root, run_uid)
        )

    server_eval = None
    if config.evaluation.server_data:
        tokenizer = load_tokenizer(config.model.path)
        records = load_records(Path(config.evaluation.server_data), tokenizer, config.train.seq_len)

        def server_eval(adapter: list[np.ndarray]) -> float:
            set_adapter_vector(model, adapter[0])
            return evaluate_loss(model, records, config.train.eval_batch_size, torch.device("cpu"))

    expert_of, layers = expert_slots(model)
    return RoundContext(
        run_uid=run_uid,
        base_fingerprint=base_fp,
        adapter_layout=adapter_layout(model),
        initial_adapter=[get_adapter_vector(model)],
        save_checkpoint=save_checkpoint,
        ask_nodes=ask_nodes,
        server_eval=server_eval,
        first_round=first_round,
        resume_note=resume_note,
        connect_timeout_s=config.federation.connect_timeout_s,
        storage_problem=storage_problem,
        expert_of=expert_of,
        expert_weighting=weighting_of_layout(
            config.privacy.enterprise, expert_of, layers, model.config.num_experts_per_tok
        ),
    )


def resume_from_intact(model: torch.nn.Module, committed: list[Round]) -> str | None:
    """Load the latest committed checkpoint that is intact (its SHA-256 as the database holds
    it, finite values), newest first; returns what was skipped, or None. The rounds whose
    checkpoints are lost stay recorded; their updates are gone, their charges stand, and the run
    goes on from the older adapter with the rounds it has left (no round is charged twice)."""
    initial = get_adapter_vector(model).copy()
    lost = []
    for record in sorted(committed, key=lambda r: r.number, reverse=True):
        try:
            load_checkpoint(model, Path(record.checkpoint_path), record.checkpoint_sha256)
        except (OSError, ValueError) as err:
            set_adapter_vector(model, initial)  # a half-loaded adapter is never trained on
            lost.append(f"round {record.number}: {err}")
            continue
        if not lost:
            return None
        return f"resumed from round {record.number}'s checkpoint; skipped {'; '.join(lost)}"
    if lost:
        return f"no intact checkpoint: resumed from the base adapter; skipped {'; '.join(lost)}"
    return None


def load_checkpoint(model: torch.nn.Module, directory: Path, sha256: str | None) -> None:
    """The adapter of a committed round, checked against the digest the database recorded."""
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot resume: the checkpoint {directory} is gone")
    if sha256 and directory_sha256(directory) != sha256:
        raise ValueError(
            f"cannot resume: the checkpoint {directory} changed since its round committed"
        )
    load_adapter_weights(model, directory)
    if not all(torch.isfinite(t).all() for t in get_adapter_tensors(model)):
        raise ValueError(f"cannot resume: the checkpoint {directory} holds NaN or infinite values")


def format_round(record: RoundRecord, config: RunConfig, base_loss: float | None = None) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    ok = sum(p.status == "ok" for p in record.participations)
    seconds = (record.ended_at - record.started_at).total_seconds()
    eval_loss = fmt(record.eval_loss)
    if (
        record.eval_loss is None
        and evaluates_with_training(config)
        and record.number < config.federation.rounds
    ):
        eval_loss = "with the next round"
    line = (
        f"[fedmoe] round {record.number}/{config.federation.rounds} | clients {ok}/{len(config.federation.enterprises)} "
        f"| train loss {fmt(record.train_loss)} | eval loss {eval_loss} | server eval {fmt(record.server_eval_loss)}"
    )
    if None not in (base_loss, record.server_eval_loss) and record.server_eval_loss > base_loss:
        line += f" (WORSE than the base model's {base_loss:.4f})"
    for level in ("record", "enterprise"):
        settings = getattr(config.privacy, level)
        spent = [
            getattr(p, f"epsilon_{level}")
            for p in record.participations
            if getattr(p, f"epsilon_{level}") is not None
        ]
        if settings is not None and spent:
            line += f" | eps {level} {max(spent):.3f}/{settings.epsilon:g}"
    refused = sum(p.status == "refused" for p in record.participations)
    failed = [
        p.enterprise or p.node_id
        for p in record.participations
        if p.status in ("failed", "rejected")
    ]
    line += f" | refused {refused}" if refused else ""
    line += f" | FAILED {', '.join(failed)}" if failed else ""
    return line + f" | {seconds:.1f}s"


def registry(store: RunStore, enterprises: list[str]):
    """Flower node id -> enterprise, for the run's enterprises, from the node registry (re-read
    every few seconds so a revoked key drops out of a running run)."""
    cache: dict = {"at": -1e9, "nodes": {}}

    def nodes() -> dict[int, str]:
        if time.monotonic() - cache["at"] > 2.0:
            wanted = set(enterprises)
            cache["nodes"] = {
                int(n.flower_node_id): n.enterprise for n in store.nodes() if n.enterprise in wanted
            }
            cache["at"] = time.monotonic()
        return cache["nodes"]

    return nodes


def run_federation(grid: Grid, context: Context, launch: FlowerRun) -> int:
    """Run (or resume) all rounds; returns the run id. The run row ends in a final status unless
    this process is killed (see the module docstring)."""
    config, run_id = launch.config, launch.run_id
    torch.set_num_threads(max(1, config.federation.threads_per_client))
    store = RunStore(launch.database_url)
    run = store.run(run_id)
    if run is None or run.status in FINAL_STATUSES:
        raise RuntimeError(
            f"run {run_id} is {'missing' if run is None else run.status}: nothing to do"
        )
    n = len(config.federation.enterprises)
    secagg = config.federation.secure_aggregation
    # The row's config: the Flower run's leaves the coordinator's trackers out (it reaches nodes).
    tracking = parse_run_config(run.config, f"run {run_id}").tracking
    feed = RunFeed(open_trackers(tracking, run_id, run.uid), store, run)
    resume_note = None  # kept in the run's record however the run ends
    try:
        store.mark_running(run_id)
        allowed = None
        enterprise_of = lambda node_id: None  # noqa: E731 - simulation: nodes name themselves
        if launch.engine == "deployment":
            nodes = registry(store, [e.name for e in config.federation.enterprises])
            allowed = lambda: set(nodes())  # noqa: E731
            enterprise_of = lambda node_id: nodes().get(node_id)  # noqa: E731
        fleet = FleetGrid(grid, allowed, default_timeout=config.federation.round_timeout_s)
        ctx = build_round_context(
            config, store, run_id, run.uid, grid_asker(fleet, secagg.timeout_s)
        )
        ctx.enterprise_of = enterprise_of
        ctx.node_errors = lambda: fleet.last_errors
        ctx.traffic = fleet.traffic
        store.set_fingerprint(run_id, ctx.base_fingerprint)
        remaining = config.federation.rounds - (ctx.first_round - 1)
        resumed = f", resumed after round {ctx.first_round - 1}" if ctx.first_round > 1 else ""
        resume_note = ctx.resume_note
        if resume_note:
            print(f"[fedmoe] WARNING: run {run_id} {resume_note}", flush=True)
        print(
            f"[fedmoe] run {run_id}: {plural(n, 'enterprise')}, "
            f"{plural(config.federation.rounds, 'round')}, "
            f"base {ctx.base_fingerprint[:12]}{resumed}",
            flush=True,
        )
        print(f"[fedmoe] {describe_privacy(run.privacy_plan)}", flush=True)
        print(f"[fedmoe] the run's result: {config.result_basis()}", flush=True)
        if remaining <= 0:
            store.finish_run(run_id, "completed")
            print(f"[fedmoe] run {run_id} completed (every round had committed)", flush=True)
            return run_id
        if ctx.server_eval is not None and ctx.first_round == 1:
            # Round 1 starts from LoRA's zero update: the initial adapter is the base model.
            base_loss = ctx.server_eval(ctx.initial_adapter)
            store.set_base_eval(run_id, base_loss)
            print(f"[fedmoe] base model server eval loss {base_loss:.4f}", flush=True)

        def on_round(record: RoundRecord) -> None:
            print(format_round(record, config, store.run(run_id).base_eval_loss), flush=True)
            feed.rounds()

        def on_evaluation(number: int, loss: float) -> None:
            print(
                f"[fedmoe] round {number} eval loss {loss:.4f} (the enterprises' held-out, sent "
                "with the next round's training)",
                flush=True,
            )
            feed.evaluation(number)

        strategy = FederatedLoRA(
            config, ctx, store, run_id, on_round=on_round, on_evaluation=on_evaluation
        )
        server_config = ServerConfig(
            num_rounds=remaining, round_timeout=config.federation.round_timeout_s
        )
        legacy = LegacyContext(context=context, config=server_config, strategy=strategy)
        fit_workflow = None
        if secagg.enabled:
            secagg_prg.install()  # the nodes mask with it; unmasking must match
            fit_workflow = SecureSumWorkflow(
                num_shares=1.0,  # every client holds shares of every other's masks
                reconstruction_threshold=secagg.reconstruction_threshold,
                max_weight=1.0,  # clients send weight 1: the coordinator gets the plain average
                clipping_range=secagg.value_range_for(config.privacy, config.federation.rounds),
                quantization_range=1 << secagg.quantization_bits,
                modulus_range=1 << 32,
                timeout=secagg.timeout_s,
            )
        try:
            DefaultWorkflow(fit_workflow=fit_workflow)(fleet, legacy)
        except BudgetExhausted as spent:
            store.finish_run(run_id, "budget_spent", _with_note(str(spent), resume_note))
            print(f"[fedmoe] run {run_id} stopped: privacy budgets are spent ({spent})", flush=True)
            return run_id
        strategy.flush()
    except Exception as err:
        _record_failure(store, run_id, err, resume_note)
        print(f"[fedmoe] run {run_id} failed: {err}", flush=True)
        raise
    except BaseException:
        # Stopped from outside (a signal: an admin's stop, or the coordinator going down): the run
        # stays `running`, and the supervisor resumes it or records how it ended.
        print(f"[fedmoe] run {run_id} interrupted; its coordinator resumes or ends it", flush=True)
        raise
    else:
        # Rounds may go on without an enterprise (min_fit_clients), or past a failed round
        # (max_failed_rounds); the run says so, loudly.
        notes = [ctx.resume_note] if ctx.resume_note else []
        if strategy.failed:
            notes.append(
                f"{len(strategy.failed)} round(s) failed: {'; '.join(strategy.failed.values())}"
            )
        if strategy.lost:
            notes.append(f"completed without some enterprises: {'; '.join(strategy.lost)}")
        note = "; ".join(notes)[:4000] or None
        result = outcome(store.rounds(run_id), store.run(run_id).base_eval_loss)
        worse = result is not None and not result.last_loss < result.base_loss
        if worse:
            # Loud, in the record too: a run that ends worse than it started is not a success.
            worse_note = (
                f"ended worse than the base model on the {result.basis} (last round "
                f"{result.last_loss:.4f} vs base {result.base_loss:.4f}); {result.describe()}"
            )
            note = f"{worse_note}; {note}" if note else worse_note
        store.finish_run(run_id, "completed", note)
        print(
            f"[fedmoe] run {run_id} completed; adapter checkpoints in {run_dir(config.output.dir, run_id)}",
            flush=True,
        )
        print(f"[fedmoe] run {run_id} {result.describe() if result else NO_EVALUATION}", flush=True)
        if note:
            print(f"[fedmoe] WARNING: run {run_id} {note}", flush=True)
        feed.result(result.describe() if result else NO_EVALUATION)
    finally:
        feed.close()
        store.close()
        print(LOG_END, flush=True)
    return run_id


def _with_note(error: str, note: str | None) -> str:
    return (f"{error}; {note}" if note else error)[:4000]


def _record_failure(
    store: RunStore, run_id: int, err: BaseException, note: str | None = None
) -> None:
    """Write `failed`; if the database itself is what failed, the supervisor records it later."""
    try:
        store.finish_run(run_id, "failed", _with_note(f"{type(err).__name__}: {err}", note))
    except Exception as db_err:  # noqa: BLE001 - the original error is what gets raised
        print(f"[fedmoe] could not record the failure of run {run_id}: {db_err}", flush=True)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, context, FlowerRun.from_run_config(context.run_config))

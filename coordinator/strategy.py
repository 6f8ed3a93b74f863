"""The coordinator's legacy Flower strategy: FedAvg of adapter deltas, weighted by examples.

A legacy `Strategy` because Flower's SecAgg+ workflow only drives legacy strategies. Clients send
adapter DELTAS (new minus global); the strategy checks each one, averages them with
`aggregation.weighted_average`, applies the average to the global adapter, checkpoints it and
writes the whole round (participants, losses, bytes, expert load) to the run database in one
transaction once federated evaluation is in.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from flwr.common import EvaluateIns, FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from fedmoe.coordinator.aggregation import MalformedUpdate, apply_update, check_update, l2_norm, weighted_average
from fedmoe.coordinator.config import RunConfig
from fedmoe.coordinator.db import ParticipationRecord, RoundRecord, RunStore, utcnow


class RoundAborted(RuntimeError):
    """Too few usable client updates: the run stops rather than silently not training."""


@dataclass
class RoundContext:
    """What the coordinator needs from the model side (kept out of the strategy for testing)."""

    base_fingerprint: str
    adapter_layout: str
    initial_adapter: list[np.ndarray]
    save_checkpoint: Callable[[int, list[np.ndarray]], tuple[str, str]]  # round, adapter -> (path, sha256)
    server_eval: Callable[[list[np.ndarray]], float] | None = None


@dataclass
class _PendingRound:
    number: int
    started_at: dt.datetime
    bytes_down: int = 0
    bytes_up: int = 0
    train_loss: float | None = None
    update_norm: float | None = None
    server_eval_loss: float | None = None
    expert_load: dict | None = None
    checkpoint: tuple[str, str] | None = None
    participations: dict[str, ParticipationRecord] = field(default_factory=dict)


def _nbytes(parameters: Parameters) -> int:
    return sum(len(t) for t in parameters.tensors)


def sum_expert_load(loads: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    total: dict[str, list[int]] = {}
    for load in loads:
        for layer, counts in load.items():
            acc = total.setdefault(layer, [0] * len(counts))
            total[layer] = [a + c for a, c in zip(acc, counts)]
    return total


class FederatedLoRA(FedAvg):
    def __init__(
        self,
        config: RunConfig,
        round_context: RoundContext,
        store: RunStore,
        run_id: int,
        on_round: Callable[[RoundRecord], None] = lambda r: None,
    ):
        num_enterprises = len(config.federation.enterprises)
        super().__init__(
            fraction_fit=config.federation.fraction_fit,
            fraction_evaluate=1.0,
            min_fit_clients=config.federation.min_fit_clients,
            min_evaluate_clients=1,
            min_available_clients=num_enterprises,
            initial_parameters=ndarrays_to_parameters(round_context.initial_adapter),
            accept_failures=True,
        )
        self.config = config
        self.ctx = round_context
        self.store = store
        self.run_id = run_id
        self.on_round = on_round
        self.global_adapter = [a.copy() for a in round_context.initial_adapter]
        self.pending: _PendingRound | None = None

    def __repr__(self) -> str:
        return f"FederatedLoRA(rounds={self.config.federation.rounds}, enterprises={len(self.config.federation.enterprises)})"

    def round_config(self, server_round: int) -> dict:
        return {
            "server_round": server_round,
            "lora": self.config.lora.model_dump_json(),
            "train": self.config.train.model_dump_json(),
            "base_fingerprint": self.ctx.base_fingerprint,
            "adapter_layout": self.ctx.adapter_layout,
            "measure_baseline": server_round == 1,
        }

    # --- fit -------------------------------------------------------------------------------
    def configure_fit(self, server_round, parameters, client_manager):
        self.flush()
        instructions = super().configure_fit(server_round, parameters, client_manager)
        fit_ins = FitIns(parameters, self.round_config(server_round))
        self.pending = _PendingRound(number=server_round, started_at=utcnow(), bytes_down=_nbytes(parameters) * len(instructions))
        for proxy, _ in instructions:
            self.pending.participations[str(proxy.node_id)] = ParticipationRecord(node_id=str(proxy.node_id), status="failed", error="no reply")
        return [(proxy, fit_ins) for proxy, _ in instructions]

    def aggregate_fit(self, server_round, results, failures):
        pending = self.pending
        deltas, weights, losses, loads = [], [], [], []
        for proxy, res in results:
            node = str(proxy.node_id)
            m = res.metrics
            record = ParticipationRecord(
                node_id=node,
                status="ok",
                enterprise=str(m.get("enterprise", "")) or None,
                num_examples=res.num_examples,
                train_loss=_float(m.get("train_loss")),
                heldout_loss_before=_float(m.get("heldout_loss_before")),
                update_norm=_float(m.get("update_norm")),
                duration_s=_float(m.get("duration_s")),
            )
            pending.bytes_up += _nbytes(res.parameters)
            delta = parameters_to_ndarrays(res.parameters)
            try:
                check_update(delta, self.global_adapter, res.num_examples)
            except MalformedUpdate as err:
                record.status, record.error = "rejected", f"malformed update: {err}"
            else:
                deltas.append(delta)
                weights.append(res.num_examples)
                losses.append(record.train_loss)
                if "expert_load" in m:
                    loads.append(json.loads(str(m["expert_load"])))
            pending.participations[node] = record
        errors = [str(f) if isinstance(f, BaseException) else f"status {f[1].status.message}" for f in failures]
        for record in pending.participations.values():
            if record.status == "failed" and errors:
                record.error = "; ".join(errors)[:2000]
        needed = self.config.federation.min_fit_clients
        if len(deltas) < needed:
            problems = [f"{r.enterprise or r.node_id}: {r.error}" for r in pending.participations.values() if r.status != "ok"]
            self.store.record_round(
                self.run_id,
                RoundRecord(
                    number=server_round,
                    started_at=pending.started_at,
                    ended_at=utcnow(),
                    status="failed",
                    bytes_up=pending.bytes_up,
                    bytes_down=pending.bytes_down,
                    participations=list(pending.participations.values()),
                ),
            )
            self.pending = None
            raise RoundAborted(f"round {server_round}: {len(deltas)} usable update(s), federation.min_fit_clients={needed}; " + "; ".join(problems)[:2000])
        average = weighted_average(deltas, weights)
        self.global_adapter = apply_update(self.global_adapter, average)
        pending.update_norm = l2_norm(average)
        pending.train_loss = float(np.average(losses, weights=weights)) if None not in losses else None
        pending.expert_load = sum_expert_load(loads) if loads else None
        pending.checkpoint = self.ctx.save_checkpoint(server_round, self.global_adapter)
        return ndarrays_to_parameters(self.global_adapter), {"train_loss": pending.train_loss or float("nan")}

    # --- evaluation ------------------------------------------------------------------------
    def evaluate(self, server_round, parameters):
        if self.ctx.server_eval is None:
            return None
        loss = self.ctx.server_eval(parameters_to_ndarrays(parameters))
        if self.pending is not None and self.pending.number == server_round:
            self.pending.server_eval_loss = loss
        return loss, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        instructions = super().configure_evaluate(server_round, parameters, client_manager)
        ins = EvaluateIns(parameters, self.round_config(server_round))
        return [(proxy, ins) for proxy, _ in instructions]

    def aggregate_evaluate(self, server_round, results, failures):
        pending = self.pending
        total, count = 0.0, 0
        for proxy, res in results:
            record = pending.participations.get(str(proxy.node_id))
            if record is not None:
                record.eval_loss = float(res.loss)
                record.enterprise = record.enterprise or str(res.metrics.get("enterprise", "")) or None
            total += float(res.loss) * res.num_examples
            count += res.num_examples
        eval_loss = total / count if count else None
        self.flush(eval_loss)
        return eval_loss, {}

    def flush(self, eval_loss: float | None = None) -> None:
        """Write the pending round (and all its participations) in one transaction."""
        pending, self.pending = self.pending, None
        if pending is None or pending.checkpoint is None:
            return
        record = RoundRecord(
            number=pending.number,
            started_at=pending.started_at,
            ended_at=utcnow(),
            status="completed",
            bytes_up=pending.bytes_up,
            bytes_down=pending.bytes_down,
            train_loss=pending.train_loss,
            eval_loss=eval_loss,
            server_eval_loss=pending.server_eval_loss,
            update_norm=pending.update_norm,
            expert_load=pending.expert_load,
            checkpoint_path=pending.checkpoint[0],
            checkpoint_sha256=pending.checkpoint[1],
            participations=sorted(pending.participations.values(), key=lambda p: (p.enterprise or "", p.node_id)),
        )
        self.store.record_round(self.run_id, record)
        self.on_round(record)


def _float(value) -> float | None:
    return None if value is None else float(value)

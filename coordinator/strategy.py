"""The coordinator's legacy Flower strategy: FedAvg of adapter deltas.

A legacy `Strategy` because Flower's SecAgg+ workflow only drives legacy strategies. Each round:
1. the budget handshake: every sampled node says whether the round fits its own privacy budget
   (and what it would spend); refusals are recorded and those nodes are not asked to train;
2. clients send adapter DELTAS (new minus global), or under SecAgg+ the coordinator gets only their
   average; the strategy checks them, averages (weighted by examples, or equally under DP),
   applies the average, checkpoints the adapter;
3. the whole round (participants, epsilon spent, losses, bytes, expert load) is written to the run
   database in one transaction.
Every enterprise that accepted a round is charged its spend, whether or not its update arrived:
it may have been released.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
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


class BudgetExhausted(RuntimeError):
    """Too few enterprises have privacy budget left for another round: the run ends cleanly."""


# node id -> its answer to the budget handshake, or why it gave none
AskNodes = Callable[[list[int], dict], dict[int, "dict | str"]]


@dataclass
class RoundContext:
    """What the coordinator needs from the model side (kept out of the strategy for testing)."""

    base_fingerprint: str
    adapter_layout: str
    initial_adapter: list[np.ndarray]
    save_checkpoint: Callable[[int, list[np.ndarray]], tuple[str, str]]  # round, adapter -> (path, sha256)
    ask_nodes: AskNodes
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
            # Held-out losses of enterprise data are not covered by any budget: not asked for under DP.
            fraction_evaluate=0.0 if config.privacy.enabled else 1.0,
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
        config = {
            "server_round": server_round,
            "rounds": self.config.federation.rounds,
            "lora": self.config.lora.model_dump_json(),
            "train": self.config.train.model_dump_json(),
            "privacy": self.config.privacy.model_dump_json(),
            "base_fingerprint": self.ctx.base_fingerprint,
            "adapter_layout": self.ctx.adapter_layout,
            "measure_baseline": server_round == 1,
        }
        secagg = self.config.federation.secure_aggregation
        if secagg.enabled:
            config["secagg_range"] = secagg.value_range_for(self.config.privacy, self.config.federation.rounds)
        return config

    def _handshake(self, server_round: int, proxies: list) -> list:
        """Ask every sampled node whether this round fits its budget; returns those that accept."""
        answers = self.ctx.ask_nodes([p.node_id for p in proxies], {**self.round_config(server_round), "query": "budget"})
        accepted = []
        for proxy in proxies:
            node, answer = str(proxy.node_id), answers.get(proxy.node_id, "no answer")
            if isinstance(answer, str):
                self.pending.participations[node] = ParticipationRecord(node_id=node, status="failed", error=f"budget handshake: {_exception_line(answer)}")
                continue
            record = ParticipationRecord(node_id=node, status="failed", enterprise=str(answer.get("enterprise", "")) or None, error="no reply")
            unguarded = [level for level in ("record", "enterprise") if getattr(self.config.privacy, level) and _finite(answer.get(f"epsilon_{level}")) is None]
            if not answer.get("accept"):
                record.status, record.error = "refused", str(answer.get("reason", "refused"))[:2000]
            elif unguarded:
                # Fail loudly rather than let a node train without the privacy the run promises.
                record.error = f"node reports no {' or '.join(unguarded)}-level privacy for this private run (a different fedmoe version?)"
            else:
                record.epsilon_record = _finite(answer.get("epsilon_record"))
                record.epsilon_enterprise = _finite(answer.get("epsilon_enterprise"))
                accepted.append(proxy)
            self.pending.participations[node] = record
        return accepted

    # --- fit -------------------------------------------------------------------------------
    def configure_fit(self, server_round, parameters, client_manager):
        self.flush()
        sampled = [proxy for proxy, _ in super().configure_fit(server_round, parameters, client_manager)]
        self.pending = _PendingRound(number=server_round, started_at=utcnow())
        accepted = self._handshake(server_round, sampled)
        needed = max(self.config.federation.min_fit_clients, 2 if self.config.federation.secure_aggregation.enabled else 1)
        if len(accepted) < needed:
            refused = [p for p in self.pending.participations.values() if p.status == "refused"]
            why = "; ".join(f"{p.enterprise or p.node_id}: {p.error}" for p in self.pending.participations.values())[:2000]
            self._record_failed_round(server_round)
            message = f"round {server_round}: {len(accepted)} of {len(sampled)} sampled enterprises can take part, {needed} needed; {why}"
            raise (BudgetExhausted if refused else RoundAborted)(message)
        config = self.round_config(server_round)
        secagg = self.config.federation.secure_aggregation
        if secagg.enabled:
            # Each client adds a share of the noise; any `noise_shares` of them carry it all, and
            # SecAgg+ never unmasks a sum of fewer clients than its reconstruction threshold.
            config["noise_shares"] = secagg.threshold_for(len(accepted))
        self.pending.bytes_down = _nbytes(parameters) * len(accepted)
        fit_ins = FitIns(parameters, config)
        return [(proxy, fit_ins) for proxy in accepted]

    def _record_failed_round(self, server_round: int) -> None:
        pending, self.pending = self.pending, None
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

    def aggregate_fit(self, server_round, results, failures):
        pending = self.pending
        deltas, weights, losses, loads = [], [], [], []
        for proxy, res in results:
            node = str(proxy.node_id)
            m = res.metrics
            record = pending.participations.get(node) or ParticipationRecord(node_id=node, status="ok")
            record.status, record.error = "ok", None
            record.enterprise = str(m.get("enterprise", "")) or record.enterprise
            record.num_examples = res.num_examples
            record.train_loss = _float(m.get("train_loss"))
            record.heldout_loss_before = _float(m.get("heldout_loss_before"))
            record.update_norm = _float(m.get("update_norm"))
            record.duration_s = _float(m.get("duration_s"))
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
        # SecAgg+ can list one failure twice.
        errors = list(dict.fromkeys(str(f) if isinstance(f, BaseException) else f"status {f[1].status.message}" for f in failures))
        for record in pending.participations.values():
            if record.status == "failed" and errors:
                record.error = "; ".join(errors)[:2000]
        needed = self.config.federation.min_fit_clients
        if len(deltas) < needed:
            problems = [f"{r.enterprise or r.node_id}: {r.error}" for r in pending.participations.values() if r.status != "ok"]
            self._record_failed_round(server_round)
            raise RoundAborted(f"round {server_round}: {len(deltas)} usable update(s), federation.min_fit_clients={needed}; " + "; ".join(problems)[:2000])
        pending.updates_seen = len({hashlib.sha256(b"".join(res.parameters.tensors)).digest() for _, res in results})
        average = weighted_average(deltas, weights)
        self.global_adapter = apply_update(self.global_adapter, average)
        pending.update_norm = l2_norm(average)
        pending.train_loss = float(np.average(losses, weights=weights)) if None not in losses else None
        pending.expert_load = sum_expert_load(loads) if loads else None
        pending.checkpoint = self.ctx.save_checkpoint(server_round, self.global_adapter)
        return ndarrays_to_parameters(self.global_adapter), {"train_loss": pending.train_loss or float("nan")}

    # --- evaluation ------------------------------------------------------------------------
    def evaluate(self, server_round, parameters):
        """Server-side evaluation; after round 0 it also checks that the round produced an aggregate."""
        pending = self.pending
        if server_round > 0 and (pending is None or pending.number != server_round or pending.checkpoint is None):
            # SecAgg+ halts without calling aggregate_fit when too few clients finish: never let
            # that pass as a round that trained.
            if pending is not None and pending.number == server_round:
                self._record_failed_round(server_round)
            raise RoundAborted(f"round {server_round}: no aggregate update arrived (secure aggregation halted: too few clients finished)")
        loss = self.ctx.server_eval(parameters_to_ndarrays(parameters)) if self.ctx.server_eval else None
        if server_round > 0:
            pending.server_eval_loss = loss
            if self.config.privacy.enabled:
                self.flush()  # no federated evaluation follows under DP
        return None if loss is None else (loss, {})

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
            updates_seen=pending.updates_seen,
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


def _exception_line(reason: str) -> str:
    """The line of a remote traceback that says what went wrong (the last `SomethingError: ...`)."""
    lines = [line.strip(" '>") for line in reason.replace("\\n", "\n").splitlines() if line.strip(" '>")]
    # Ray wraps the client's own exception: skip its wrapper lines.
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Exceeded)\b.*:", line) and not line.startswith("ray.")]
    return (errors or lines or ["(no reason given)"])[-1][:500]


def _finite(value) -> float | None:
    """An epsilon as recorded: None where the level is off (infinite epsilon, no guarantee)."""
    return None if value is None or not np.isfinite(float(value)) else float(value)

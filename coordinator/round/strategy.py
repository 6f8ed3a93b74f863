"""The coordinator's legacy Flower strategy: FedAvg of adapter deltas.

A legacy `Strategy` because Flower's SecAgg+ workflow only drives legacy strategies. Each round:
1. in private runs and under secure aggregation, the budget handshake: every sampled node says
   whether the round fits its own privacy budget (and what it would spend); refusals are recorded
   and those nodes are not asked to train (in a plain run a node refuses in its training reply);
2. clients send adapter DELTAS (new minus global), or under SecAgg+ the coordinator gets only their
   average; the strategy checks them, averages (weighted by examples, or equally under DP),
   applies the average, checkpoints the adapter;
3. the whole round (participants, epsilon spent, losses, bytes, expert load) is written to the run
   database in one transaction;
4. federated evaluation: the enterprises' held-out loss of the round's adapter. In a public run
   in the clear it rides on the next round's training replies (each node scores the adapter it
   receives before training on it) and is written to the round when they arrive, so that a round
   costs one message round trip, not two; only the last round is asked by an evaluate message.
   Under secure aggregation every round is asked by its own message; under DP none is.
Every enterprise that accepted a round is charged its spend, whether or not its update arrived:
it may have been released.

Rounds are numbered for the run, not for the Flower run carrying it: a resumed run starts at
`first_round`. Which enterprise a node is comes from `enterprise_of` (the node registry on the
deployment engine); what a node says about itself is used only where no registry exists
(the simulation engine, whose nodes the coordinator starts itself).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.common import (
    EvaluateIns,
    FitIns,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.strategy import FedAvg

from fedmoe.contract.expert_weighting import Weighting, expert_weighted_update
from fedmoe.contract.round import BUDGET_QUERY, BudgetAnswer, MalformedRound, RoundSpec
from fedmoe.coordinator.config import RunConfig
from fedmoe.coordinator.round.aggregation import (
    MalformedUpdate,
    apply_update,
    check_update,
    l2_norm,
    weighted_average,
)
from fedmoe.coordinator.store.db import ParticipationRecord, RoundRecord, RunStore, utcnow
from fedmoe.privacy.audit import epsilon_lower_bound


class RoundAborted(RuntimeError):
    """Too few usable client updates: the run stops rather than silently not training."""


class RoundLost(RoundAborted):
    """Every node that did not train refused the round as a replay: it was released (or its draw
    was cut short) before the coordinator stopped. Its budget is spent; the run goes on."""


class BudgetExhausted(RuntimeError):
    """Too few enterprises have privacy budget left for another round: the run ends cleanly."""


# A node's errors that mean "this node may not take part", not "this node failed".
REFUSALS = ("BudgetExceeded", "ReplayRefused", "RoundRefused")


def evaluates_with_training(config: RunConfig) -> bool:
    """Whether round r's federated evaluation arrives with round r+1's training replies: in public
    runs in the clear (a node's reply under SecAgg+ is masked; under DP held-out losses are not
    asked at all)."""
    return not config.privacy.enabled and not config.federation.secure_aggregation.enabled


# node id -> its answer to the budget handshake, or why it gave none
AskNodes = Callable[[list[int], dict], dict[int, "dict | str"]]


@dataclass
class RoundContext:
    """What the coordinator needs from the model side (kept out of the strategy for testing)."""

    run_uid: str
    base_fingerprint: str
    adapter_layout: str
    initial_adapter: list[np.ndarray]
    save_checkpoint: Callable[
        [int, list[np.ndarray]], tuple[str, str]
    ]  # round, adapter -> (path, sha256)
    ask_nodes: AskNodes
    server_eval: Callable[[list[np.ndarray]], float] | None = None
    first_round: int = 1  # > 1 when a resumed run continues
    resume_note: str | None = None  # a resumed run that skipped lost checkpoints says which
    enterprise_of: Callable[[int], str | None] = lambda node_id: None  # the node registry
    node_errors: Callable[[], dict[int, str]] = dict  # why each node's last reply failed
    connect_timeout_s: float = 600.0
    # Each adapter element's routed-expert slot, or -1 (model.lora.expert_slots): the layout that
    # expert-weighted aggregation reads the nodes' vectors with.
    expert_of: np.ndarray | None = None
    # Bytes (sent, received) by the run so far, every message counted (FleetGrid.traffic): under
    # SecAgg+ most of a round's messages never reach the strategy.
    traffic: Callable[[], tuple[int, int]] = lambda: (0, 0)
    expert_weighting: Weighting = Weighting()  # its public scales (contract/expert_weighting.py)
    # Why this round could not commit (checkpoint storage), or None: asked before any node is.
    storage_problem: Callable[[], str | None] = lambda: None


@dataclass
class _PendingRound:
    number: int
    started_at: dt.datetime
    traffic_at_start: tuple[int, int] = (0, 0)  # RoundContext.traffic when the round began
    updates_seen: int | None = None
    train_loss: float | None = None
    update_norm: float | None = None
    server_eval_loss: float | None = None
    expert_load: dict | None = None
    checkpoint: tuple[str, str] | None = None
    trained: list = field(default_factory=list)  # proxies whose update was averaged
    participations: dict[str, ParticipationRecord] = field(default_factory=dict)


def sum_expert_load(loads: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    total: dict[str, list[int]] = {}
    for load in loads:
        for layer, counts in load.items():
            acc = total.setdefault(layer, [0] * len(counts))
            total[layer] = [a + c for a, c in zip(acc, counts, strict=True)]
    return total


class FederatedLoRA(FedAvg):
    def __init__(
        self,
        config: RunConfig,
        round_context: RoundContext,
        store: RunStore,
        run_id: int,
        on_round: Callable[[RoundRecord], None] = lambda r: None,
        on_evaluation: Callable[[int, float], None] = lambda number, loss: None,
    ):
        super().__init__(
            fraction_fit=config.federation.fraction_fit,
            # Held-out losses of enterprise data are not covered by any budget: not asked for under DP.
            fraction_evaluate=0.0 if config.privacy.enabled else 1.0,
            min_fit_clients=config.federation.min_fit_clients,
            min_evaluate_clients=1,
            min_available_clients=config.federation.min_fit_clients,
            initial_parameters=ndarrays_to_parameters(round_context.initial_adapter),
            accept_failures=True,
        )
        self.config = config
        self.ctx = round_context
        self.store = store
        self.run_id = run_id
        self.on_round = on_round
        self.on_evaluation = on_evaluation
        self.with_training = evaluates_with_training(config)
        # The committed round whose adapter the nodes receive next (they score it before
        # training); unknown after a resume that fell back past a lost checkpoint.
        self.adapter_round: int | None = (
            round_context.first_round - 1 if round_context.resume_note is None else None
        )
        self.global_adapter = [a.copy() for a in round_context.initial_adapter]
        self.pending: _PendingRound | None = None
        self.lost: list[str] = []  # enterprises that failed or were rejected in a committed round
        self.failed: dict[int, str] = {}  # rounds that failed while the run went on: why
        self.replayed: set[int] = set()  # of those, rounds lost to an earlier interruption
        self.claimed: dict[int, str] = {}  # node id -> the name a simulated node gave itself

    def __repr__(self) -> str:
        return f"FederatedLoRA(rounds={self.config.federation.rounds}, enterprises={len(self.config.federation.enterprises)})"

    def number(self, flower_round: int) -> int:
        """The run's round number of Flower's `flower_round` (Flower counts from 1 per Flower run)."""
        return self.ctx.first_round - 1 + flower_round

    def round_spec(self, number: int, **changes) -> RoundSpec:
        fed = self.config.federation
        secagg = fed.secure_aggregation
        return RoundSpec(
            server_round=number,
            rounds=fed.rounds,
            run_uid=self.ctx.run_uid,
            run_number=self.run_id,
            lora=self.config.lora,
            aggregation=self.config.federation.aggregation,
            base=self.config.model.loading,
            train=self.config.train,
            privacy=self.config.privacy,
            base_fingerprint=self.ctx.base_fingerprint,
            adapter_layout=self.ctx.adapter_layout,
            measure_baseline=number == 1 or self.with_training,
            secagg_range=secagg.value_range_for(self.config.privacy, fed.rounds)
            if secagg.enabled
            else None,
            **changes,
        )

    def _name(self, node_id: int, claimed: str | None) -> str | None:
        """The registry's name (deployment), else what the node calls itself (simulation)."""
        if claimed:
            self.claimed[node_id] = claimed
        return self.ctx.enterprise_of(node_id) or self.claimed.get(node_id)

    def _handshake(self, number: int, proxies: list) -> list:
        """Ask every sampled node whether this round fits its budget; returns those that accept."""
        config = self.round_spec(number).to_config(query=BUDGET_QUERY)
        answers = self.ctx.ask_nodes([p.node_id for p in proxies], config)
        accepted = []
        for proxy in proxies:
            node = str(proxy.node_id)
            raw = answers.get(proxy.node_id, "no answer")
            try:
                answer = raw if isinstance(raw, str) else BudgetAnswer.from_properties(raw)
            except MalformedRound as err:
                answer = str(err)
            if isinstance(answer, str):
                error = f"budget handshake: {_exception_line(answer)}"
                name = self._name(proxy.node_id, None)
                self.pending.participations[node] = ParticipationRecord(
                    node_id=node, status="failed", enterprise=name, error=error
                )
                continue
            name = self._name(proxy.node_id, answer.enterprise)
            record = ParticipationRecord(
                node_id=node, status="failed", enterprise=name, error="no reply"
            )
            unguarded = [
                level
                for level in ("record", "enterprise")
                if getattr(self.config.privacy, level)
                and _finite(getattr(answer, f"epsilon_{level}")) is None
            ]
            if answer.failed:
                record.error = f"budget handshake: {_exception_line(answer.reason)}"
            elif not answer.accept:
                record.status, record.error = "refused", answer.reason or "refused"
            elif unguarded:
                # Fail loudly rather than let a node train without the privacy the run promises.
                record.error = f"node reports no {' or '.join(unguarded)}-level privacy for this private run (a different fedmoe version?)"
            else:
                record.epsilon_record = _finite(answer.epsilon_record)
                record.epsilon_enterprise = _finite(answer.epsilon_enterprise)
                accepted.append(proxy)
            self.pending.participations[node] = record
        return accepted

    def _wait_for_enterprises(self, client_manager, wanted: int) -> None:
        """Wait (bounded) until `wanted` of the run's enterprises are connected."""
        deadline = time.monotonic() + self.ctx.connect_timeout_s
        while client_manager.num_available() < wanted and time.monotonic() < deadline:
            time.sleep(0.5)

    # --- fit -------------------------------------------------------------------------------
    def configure_fit(self, server_round, parameters, client_manager):
        self.flush()
        number = self.number(server_round)
        fed = self.config.federation
        # The first round of a (resumed) run waits for every enterprise; later ones go on
        # with whoever is connected, so one lost node cannot hang the run.
        self._wait_for_enterprises(
            client_manager, len(fed.enterprises) if server_round == 1 else fed.min_fit_clients
        )
        available = client_manager.num_available()
        sample_size = min(
            available, max(math.ceil(available * fed.fraction_fit), fed.min_fit_clients)
        )
        sampled = (
            client_manager.sample(num_clients=sample_size, min_num_clients=1) if sample_size else []
        )
        self.pending = _PendingRound(
            number=number, started_at=utcnow(), traffic_at_start=self.ctx.traffic()
        )
        # Check before charge: a round that could not commit fails before any node is asked
        # (the handshake, then the fit, is where nodes charge their ledgers).
        if (problem := self._commit_problem()) is not None:
            self._record_failed_round()
            self._fail(number, RoundAborted(f"round {number}: {problem}; no node was asked"))
            return []
        if self.config.privacy.enabled or fed.secure_aggregation.enabled:
            accepted = self._handshake(number, sampled) if sampled else []
        else:
            # One message less per round: a node that must refuse says so instead of training.
            # Nodes not named yet (the simulation's, in their first round) are asked once: the
            # answer names them, so that a failure is reported by enterprise.
            unnamed = [p for p in sampled if self._name(p.node_id, None) is None]
            accepted = self._handshake(number, unnamed) if unnamed else []
            for proxy in sampled:
                if proxy in unnamed:
                    continue
                accepted.append(proxy)
                name = self._name(proxy.node_id, None)
                record = ParticipationRecord(
                    node_id=str(proxy.node_id), status="failed", enterprise=name, error="no reply"
                )
                self.pending.participations[record.node_id] = record
        needed = max(fed.min_fit_clients, 2 if fed.secure_aggregation.enabled else 1)
        if len(accepted) < needed:
            refused = [p for p in self.pending.participations.values() if p.status == "refused"]
            why = "; ".join(
                f"{p.enterprise or p.node_id}: {p.error}"
                for p in self.pending.participations.values()
            )
            if not sampled:
                why = f"no enterprise connected within federation.connect_timeout_s={self.ctx.connect_timeout_s:g}"
            self._record_failed_round()
            message = f"round {number}: {len(accepted)} of {len(sampled)} sampled enterprises can take part, {needed} needed; {why}"
            self._fail(number, (BudgetExhausted if refused else RoundAborted)(message[:4000]))
            return []
        changes = {}
        if fed.secure_aggregation.enabled:
            # Each client adds a share of the noise; any `noise_shares` of them carry it all, and
            # SecAgg+ never unmasks a sum of fewer clients than its reconstruction threshold.
            changes["noise_shares"] = fed.secure_aggregation.threshold_for(len(accepted))
        fit_ins = FitIns(parameters, self.round_spec(number, **changes).to_config())
        return [(proxy, fit_ins) for proxy in accepted]

    def _commit_problem(self) -> str | None:
        if (problem := self.ctx.storage_problem()) is not None:
            return problem
        try:
            self.store.run(self.run_id)
        except Exception as err:  # noqa: BLE001 - any driver's error: the database is unusable
            raise RoundAborted(
                f"the run database is unreachable ({type(err).__name__}); no node was asked"
            ) from None
        return None

    def _round_bytes(self, pending: _PendingRound) -> dict[str, int]:
        """Bytes of every message since the round began: the budget handshake, training (all of
        SecAgg+'s stages) and federated evaluation."""
        down, up = self.ctx.traffic()
        return {
            "bytes_down": down - pending.traffic_at_start[0],
            "bytes_up": up - pending.traffic_at_start[1],
        }

    def _fail(self, number: int, error: RoundAborted | BudgetExhausted) -> None:
        """After round `number` is recorded as failed: raise `error` (the run stops), unless
        federation.max_failed_rounds lets the run go on from the same adapter."""
        tolerated = self.config.federation.max_failed_rounds
        if isinstance(error, RoundLost):
            # Not a fault of this run's rounds: the nodes keep one release per round.
            self.failed[number] = str(error)
            self.replayed.add(number)
            print(
                f"[fedmoe] round {number} is lost (its nodes released it, or were cut short, "
                f"before the coordinator stopped) and is recorded; the run goes on: {error}",
                flush=True,
            )
            return
        counted = len(self.failed) - len(self.replayed)
        if isinstance(error, BudgetExhausted) or counted >= tolerated:
            raise error
        self.failed[number] = str(error)
        print(
            f"[fedmoe] round {number} failed and is recorded; the run goes on from the same "
            f"adapter ({counted + 1} of federation.max_failed_rounds={tolerated}): {error}",
            flush=True,
        )

    def _record_failed_round(self) -> None:
        pending, self.pending = self.pending, None
        self.store.record_round(
            self.run_id,
            RoundRecord(
                number=pending.number,
                started_at=pending.started_at,
                ended_at=utcnow(),
                status="failed",
                **self._round_bytes(pending),
                participations=list(pending.participations.values()),
            ),
        )

    def aggregate_fit(self, server_round, results, failures):
        pending = self.pending
        deltas, weights, losses, loads = [], [], [], []
        expected = self._expected_update()
        for proxy, res in results:
            node = str(proxy.node_id)
            m = res.metrics
            record = pending.participations.get(node) or ParticipationRecord(
                node_id=node, status="ok"
            )
            record.status, record.error = "ok", None
            record.enterprise = self._name(
                proxy.node_id, str(m.get("enterprise", "")) or record.enterprise
            )
            record.num_examples = res.num_examples
            record.train_loss = _float(m.get("train_loss"))
            record.heldout_loss_before = _float(m.get("heldout_loss_before"))
            record.update_norm = _float(m.get("update_norm"))
            record.duration_s = _float(m.get("duration_s"))
            delta = parameters_to_ndarrays(res.parameters)
            try:
                check_update(delta, expected, res.num_examples)
            except MalformedUpdate as err:
                record.status, record.error = "rejected", f"malformed update: {err}"
            else:
                deltas.append(delta)
                weights.append(res.num_examples)
                losses.append(record.train_loss)
                pending.trained.append(proxy)
                if "expert_load" in m:
                    loads.append(json.loads(str(m["expert_load"])))
            pending.participations[node] = record
        self._record_previous_evaluation(results)
        attributed = self.ctx.node_errors()
        # SecAgg+ can list one failure twice.
        errors = list(dict.fromkeys(_failure_text(f) for f in failures))
        for record in pending.participations.values():
            if record.status != "failed":
                continue
            if (reason := attributed.get(int(record.node_id))) is not None:
                record.error = _exception_line(reason)
                if record.error.startswith(REFUSALS):
                    record.status = "refused"
            elif errors:
                record.error = "; ".join(errors)[:2000]
        needed = self.config.federation.min_fit_clients
        if len(deltas) < needed:
            problems = [
                f"{r.enterprise or r.node_id}: {r.error}"
                for r in pending.participations.values()
                if r.status != "ok"
            ]
            others = [r for r in pending.participations.values() if r.status != "ok"]
            refused = any(r.status == "refused" for r in others)
            replayed = bool(others) and all(
                (r.error or "").startswith("ReplayRefused") for r in others
            )
            self._record_failed_round()
            self._fail(
                pending.number,
                (RoundLost if replayed else BudgetExhausted if refused else RoundAborted)(
                    f"round {pending.number}: {len(deltas)} usable update(s), federation.min_fit_clients={needed}; "
                    + "; ".join(problems)[:2000]
                ),
            )
            return None, {}
        pending.updates_seen = len(
            {hashlib.sha256(b"".join(res.parameters.tensors)).digest() for _, res in results}
        )
        average = weighted_average(deltas, weights)
        if self.config.federation.aggregation == "expert-weighted":
            average = [
                expert_weighted_update(average[0], self.ctx.expert_of, self.ctx.expert_weighting)
            ]
        self.global_adapter = apply_update(
            self.global_adapter, average, self.config.federation.server_lr
        )
        pending.update_norm = l2_norm(average)
        pending.train_loss = (
            float(np.average(losses, weights=weights)) if None not in losses else None
        )
        pending.expert_load = sum_expert_load(loads) if loads else None
        pending.checkpoint = self.ctx.save_checkpoint(pending.number, self.global_adapter)
        self.adapter_round = pending.number
        return ndarrays_to_parameters(self.global_adapter), {
            "train_loss": pending.train_loss or float("nan")
        }

    def _expected_update(self) -> list[np.ndarray]:
        """What a node's update must look like: the adapter, and under expert-weighted
        aggregation one count fraction per routed-expert slot after it."""
        if self.config.federation.aggregation == "fedavg":
            return self.global_adapter
        slots = int(self.ctx.expert_of.max()) + 1
        return [np.zeros(self.global_adapter[0].size + slots, self.global_adapter[0].dtype)]

    # --- evaluation ------------------------------------------------------------------------
    def evaluate(self, server_round, parameters):
        """Server-side evaluation; after round 0 it also checks that the round produced an aggregate."""
        pending = self.pending
        number = self.number(server_round)
        if server_round > 0 and (
            pending is None or pending.number != number or pending.checkpoint is None
        ):
            if number in self.failed:  # failed earlier in the round, and the run goes on
                return None
            # SecAgg+ halts without calling aggregate_fit when too few clients finish: never let
            # that pass as a round that trained.
            halted = RoundAborted(
                f"round {number}: no aggregate update arrived (secure aggregation halted: too few clients finished)"
            )
            if pending is None or pending.number != number:
                raise halted
            self._record_failed_round()
            self._fail(number, halted)
            return None
        loss = (
            self.ctx.server_eval(parameters_to_ndarrays(parameters))
            if self.ctx.server_eval
            else None
        )
        if server_round > 0:
            pending.server_eval_loss = loss
            if not self._evaluates_by_message(pending.number):
                self.flush()  # no evaluate message follows
        return None if loss is None else (loss, {})

    def configure_evaluate(self, server_round, parameters, client_manager):
        """Held-out losses (public runs) from the enterprises whose update this round averaged
        and that are still connected; nobody is waited for. After the last round of an audited
        run, the same message also asks each of them for its audit counts."""
        if self.pending is None:
            return []
        audit = self._audits(self.pending.number)
        if not self._evaluates_by_message(self.pending.number):
            return []
        connected = {p.node_id for p in client_manager.all().values()}
        ins = EvaluateIns(parameters, self.round_spec(self.pending.number, audit=audit).to_config())
        return [(proxy, ins) for proxy in self.pending.trained if proxy.node_id in connected]

    def _evaluates_by_message(self, number: int) -> bool:
        """Whether round `number` ends with an evaluate message (see the module docstring)."""
        if self._audits(number):
            return True
        if self.fraction_evaluate == 0.0:
            return False
        return not self.with_training or number == self.config.federation.rounds

    def _record_previous_evaluation(self, results) -> None:
        """The held-out losses that this round's training replies carry, of the adapter the
        nodes received: the federated evaluation of the round that made it."""
        number = self.adapter_round
        if not self.with_training or number is None or number < 1:
            return
        losses = {
            str(proxy.node_id): (loss, _count(res.metrics.get("heldout_examples")))
            for proxy, res in results
            if (loss := _loss(res.metrics.get("heldout_loss_before"))) is not None
        }
        weight = sum(count for _, count in losses.values())
        if not weight:
            return
        eval_loss = sum(loss * count for loss, count in losses.values()) / weight
        per_node = {node: loss for node, (loss, _) in losses.items()}
        if self.store.record_evaluation(self.run_id, number, eval_loss, per_node):
            self.on_evaluation(number, eval_loss)

    def _audits(self, number: int) -> bool:
        """Whether round `number` ends with the one-run audit (the run's last round)."""
        return self.config.privacy.audit is not None and number == self.config.federation.rounds

    def aggregate_evaluate(self, server_round, results, failures):
        pending = self.pending
        total, count = 0.0, 0
        counts = {"canaries": 0, "guesses": 0, "correct": 0}
        for proxy, res in results:
            record = pending.participations.get(str(proxy.node_id))
            if res.num_examples:  # a private node answers an audit with counts only
                if record is not None:
                    record.eval_loss = float(res.loss)
                total += float(res.loss) * res.num_examples
                count += res.num_examples
            node = {key: _count(res.metrics.get(f"audit_{key}")) for key in counts}
            if 0 <= node["correct"] <= node["guesses"] <= node["canaries"]:
                counts = {key: counts[key] + node[key] for key in counts}
        eval_loss = total / count if count else None
        self.flush(eval_loss)
        if counts["guesses"]:
            self._record_audit(**counts)
        return eval_loss, {}

    def _record_audit(self, canaries: int, guesses: int, correct: int) -> None:
        """The one-run audit's lower bound from the nodes' summed counts; loud if it refutes the
        run's record-level claim."""
        audit, record = self.config.privacy.audit, self.config.privacy.record
        delta = record.delta if record else 1e-5
        bound = epsilon_lower_bound(canaries, guesses, correct, delta, audit.confidence)
        claimed = record.epsilon if record else None
        self.store.record_audit(
            self.run_id,
            dict(
                canaries=canaries, guesses=guesses, correct=correct, delta=delta,
                confidence=audit.confidence, epsilon_lower_bound=bound, claimed_epsilon=claimed,
            ),
        )  # fmt: skip
        claim = f"claimed {claimed:g}" if claimed is not None else "no record-level claim"
        print(
            f"[fedmoe] audit: record-level epsilon >= {bound:.3f} at {audit.confidence:.0%} "
            f"confidence ({claim}; {correct} of {guesses} guesses right, {canaries} canaries)",
            flush=True,
        )
        if claimed is not None and bound > claimed:
            print(
                f"[fedmoe] WARNING: the audit refutes the run's privacy claim: epsilon >= {bound:.3f} "
                f"> {claimed:g}. Do not trust this run's record-level guarantee; report it.",
                flush=True,
            )

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
            **self._round_bytes(pending),
            updates_seen=pending.updates_seen,
            train_loss=pending.train_loss,
            eval_loss=eval_loss,
            server_eval_loss=pending.server_eval_loss,
            update_norm=pending.update_norm,
            expert_load=pending.expert_load,
            checkpoint_path=pending.checkpoint[0],
            checkpoint_sha256=pending.checkpoint[1],
            participations=sorted(
                pending.participations.values(), key=lambda p: (p.enterprise or "", p.node_id)
            ),
        )
        self.store.record_round(self.run_id, record)
        self.lost += [
            f"round {record.number}: {p.enterprise or p.node_id} {p.status} ({p.error})"
            for p in record.participations
            if p.status in ("failed", "rejected")
        ]
        self.on_round(record)


def _float(value) -> float | None:
    return None if value is None else float(value)


def _loss(value) -> float | None:
    """A loss a node reported, or None when absent or not a finite non-negative number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def _failure_text(failure) -> str:
    if isinstance(failure, BaseException):
        return _exception_line(str(failure))
    return f"status {failure[1].status.message}"


def _exception_line(reason: str) -> str:
    """The line of a remote error that says what went wrong, as `ErrorType: message`."""
    text = reason.replace("\\n", "\n").strip()
    # Flower's ClientApp wraps an exception as "<class 'pkg.mod.Type'>:<'message'>".
    if wrapped := re.match(r"^<class '(?:\w+\.)*(\w+)'>:<'(.*)'>$", text, re.S):
        text = f"{wrapped.group(1)}: {wrapped.group(2)}"
    lines = [line.strip(" '>") for line in text.splitlines() if line.strip(" '>")]
    # Ray and our worker socket wrap the node's own exception: keep its innermost line.
    pattern = r"^[A-Za-z_.]*(Error|Exception|Exceeded|Refused)\b.*:"
    errors = [line for line in lines if re.match(pattern, line) and not line.startswith("ray.")]
    line = (errors or lines or ["(no reason given)"])[-1]
    line = re.sub(r"^(?:\w+\.)+(\w+:)", r"\1", line).removeprefix("NodeError: ")
    # Flower's simulation wraps a ClientApp's error once more.
    line = re.sub(r"^Exception ClientAppException occurred\. Message: ", "", line)
    return line[:500]


def _count(value) -> int:
    """A count a node reported (0 when absent or malformed: the audit then sees fewer guesses)."""
    return value if isinstance(value, int) and 0 <= value <= 10_000_000 else 0


def _finite(value) -> float | None:
    """An epsilon as recorded: None where the level is off (infinite epsilon, no guarantee)."""
    return None if value is None or not np.isfinite(float(value)) else float(value)

"""One enterprise node's side of a round: the node's privacy boundary.

Everything that touches the enterprise's records happens here, in the process that holds the
model and the data warm: the budget check against the node's OWN ledger, local training (plain or
DP-SGD), clipping and noise on the update, and the decision of what leaves. Callers (the per-message
ClientApp through the agent's worker socket, or Flower's simulation engine in-process) only pass
the coordinator's round config and the global adapter in, and the release out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedmoe.client.dp_trainer import train_local_private
from fedmoe.client.ledger import (
    CLEAR,
    BudgetExceeded,
    Draw,
    PrivacyLedger,
    Release,
    ReplayRefused,
)
from fedmoe.client.ledger_witness import open_ledger
from fedmoe.client.settings import NodeSettings
from fedmoe.client.trainer import train_local
from fedmoe.contract.expert_weighting import weighted_release, weighting_of_layout
from fedmoe.contract.round import BudgetAnswer, MalformedRound, RoundSpec, SecureSum
from fedmoe.model.base import fingerprint, load_base, load_tokenizer
from fedmoe.model.data import DataFiles, tokenize_blocks, tokenize_records
from fedmoe.model.lora import (
    adapter_layout,
    attach_lora,
    expert_slots,
    get_adapter_vector,
    set_adapter_vector,
)
from fedmoe.model.loss import evaluate_loss, per_sequence_loss
from fedmoe.model.settings import BaseLoading, LoraSettings
from fedmoe.privacy.audit import make_canaries, score_guesses
from fedmoe.privacy.mechanisms import l2_norm
from fedmoe.privacy.plan import InfeasiblePlan, PrivacyPlan, plan_run, privatize_update
from fedmoe.privacy.settings import PrivacySettings


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda requested but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Workspace:
    """What a node keeps warm between rounds: the adapted model and its tokenized data."""

    node: NodeSettings
    model: torch.nn.Module
    base_fingerprint: str
    layout: str
    train_blocks: torch.Tensor
    # Held-out loss is per record (one per row, like DP-SGD's examples): a model trained on
    # records is judged on what it learned, not on how records pack into blocks.
    heldout_records: torch.Tensor
    device: torch.device
    seq_len: int

    @property
    def train_records(self) -> torch.Tensor:
        """One training record per row, for record-level DP."""
        return _records(self.node.data_files, "train", self.node.model_path, self.seq_len)


@lru_cache(maxsize=2)
def _adapted_model(
    model_path: str, loading_json: str, lora_json: str, device: str
) -> tuple[torch.nn.Module, str, str]:
    base = load_base(model_path, BaseLoading.model_validate_json(loading_json), device)
    base_fp = fingerprint(base)
    model = attach_lora(base, LoraSettings.model_validate_json(lora_json)).to(device)
    return model, base_fp, adapter_layout(model)


@lru_cache(maxsize=8)
def _blocks(files: DataFiles, split: str, model_path: str, seq_len: int) -> torch.Tensor:
    return tokenize_blocks(files.texts(split), load_tokenizer(model_path), seq_len)


@lru_cache(maxsize=8)
def _records(files: DataFiles, split: str, model_path: str, seq_len: int) -> torch.Tensor:
    return tokenize_records(files.texts(split), load_tokenizer(model_path), seq_len)


def workspace(
    node: NodeSettings, lora: LoraSettings, seq_len: int, loading: BaseLoading | None = None
) -> Workspace:
    loading = loading or BaseLoading()
    torch.set_num_threads(node.threads)
    device = pick_device(node.device)
    model, base_fp, layout = _adapted_model(
        node.model_path, loading.model_dump_json(), lora.model_dump_json(), str(device)
    )
    return Workspace(
        node=node,
        model=model,
        base_fingerprint=base_fp,
        layout=layout,
        train_blocks=_blocks(node.data_files, "train", node.model_path, seq_len),
        heldout_records=_records(node.data_files, "heldout", node.model_path, seq_len),
        device=device,
        seq_len=seq_len,
    )


@lru_cache(maxsize=16)
def _privacy_plan(privacy_json: str, records: int, steps: int, rounds: int) -> PrivacyPlan:
    return plan_run(PrivacySettings.model_validate_json(privacy_json), records, steps, rounds)


def _expert_weighted(
    delta: np.ndarray, ws: Workspace, spec: RoundSpec, expert_load: dict[str, list[int]]
) -> np.ndarray:
    """The update in expert-weighted form (contract/expert_weighting.py): each expert's token
    count over the round's public bound on it, the same bound on every node."""
    expert_of, layers = expert_slots(ws.model)
    train, top_k = spec.train, ws.model.config.num_experts_per_tok
    bound = train.local_steps * train.batch_size * train.seq_len * top_k
    counts = np.concatenate([np.asarray(expert_load[str(layer)], np.float64) for layer in layers])
    weighting = weighting_of_layout(spec.privacy.enterprise, expert_of, layers, top_k)
    return weighted_release(delta, expert_of, np.minimum(counts / bound, 1.0), weighting)


class RoundRefused(RuntimeError):
    """The coordinator asked for a round this node's own terms do not allow; nothing was trained
    and nothing was charged."""


class RoundFailed(RuntimeError):
    """The round's one draw failed after its charge; asked again, it fails again."""


class ReleaseRefused(ValueError):
    """What the draw produced must not leave (a check on the DP output only, so its reason may
    be told)."""


def _check_round(ws: Workspace, spec: RoundSpec) -> None:
    if spec.base_fingerprint != ws.base_fingerprint:
        raise RuntimeError(
            f"base model mismatch: the coordinator trains base {spec.base_fingerprint[:12]}, this node "
            f"has {ws.base_fingerprint[:12]}; point the agent's model at the same checkpoint"
        )
    if spec.adapter_layout != ws.layout:
        raise RuntimeError(
            "adapter layout mismatch between coordinator and node (different fedmoe versions or LoRA settings)"
        )


def _global_adapter(parameters: list[np.ndarray], ws: Workspace) -> np.ndarray:
    """Load the coordinator's adapter (one vector, see model.lora.get_adapter_vector) into the model."""
    if len(parameters) != 1:
        raise ValueError(f"expected the adapter as one vector, got {len(parameters)} arrays")
    vector = np.asarray(parameters[0], dtype=np.float32)
    if not np.isfinite(vector).all():
        raise ValueError(
            "the global adapter holds NaN or infinite values: the coordinator's checkpoint is corrupt"
        )
    set_adapter_vector(ws.model, vector)
    return vector


def parameters_sha256(parameters: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for p in parameters:
        a = np.ascontiguousarray(p)
        h.update(f"{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _enterprise_seed(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


@contextlib.contextmanager
def _base_only(ws: Workspace):
    """The frozen base alone: every LoRA factor zero (A = B = 0 adds nothing), then restored."""
    adapter = get_adapter_vector(ws.model).copy()
    set_adapter_vector(ws.model, np.zeros_like(adapter))
    try:
        yield
    finally:
        set_adapter_vector(ws.model, adapter)


def _sequence_losses(ws: Workspace, rows: torch.Tensor, batch_size: int) -> np.ndarray:
    losses = [
        per_sequence_loss(ws.model, rows[i : i + batch_size].to(ws.device)).float().cpu()
        for i in range(0, rows.shape[0], batch_size)
    ]
    return torch.cat(losses).numpy()


@dataclass
class Refusals:
    """The rounds this node refused since its process started, for its own operator's monitoring
    (client/metrics.py): how many, and the last one's time and reason. Refusals are not on the
    ledger: a refused round spent nothing."""

    count: int = 0
    last_at: float | None = None  # Unix time
    last_reason: str = ""

    def note(self, reason: str) -> None:
        self.count += 1
        self.last_at, self.last_reason = time.time(), reason


class EnterpriseNode:
    """One enterprise: checks its own privacy budget, trains, privatizes, releases a delta."""

    def __init__(self, node: NodeSettings):
        self.node = node
        self._canary_cache: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}
        self.ledger = (
            open_ledger(node.ledger_path, node.identity_key, node.witness_path)
            if node.witnessed_ledger
            else PrivacyLedger(node.ledger_path)
        )
        self.budgets = {
            "record": node.budget.record_epsilon,
            "enterprise": node.budget.enterprise_epsilon,
        }
        self.federation = node.federation()
        self._warned_timing = False
        self.refusals = Refusals()

    def warm_up(self, lora: LoraSettings | None = None, seq_len: int = 64) -> Workspace:
        """Load the model and tokenize the data now, so the first round does not pay for it."""
        return workspace(self.node, lora or LoraSettings(), seq_len)

    def _canaries(self, spec: RoundSpec, ws: Workspace) -> tuple[torch.Tensor, np.ndarray]:
        """The run's audit canaries (all of them: samples of the frozen base from this node's
        secret seed) and which ones this node trains on; made once per run and kept."""
        key = (spec.run_uid, spec.privacy.audit.canaries, spec.train.seq_len)
        if key not in self._canary_cache:
            cache = {}

            def next_token_probs(prefixes: np.ndarray) -> np.ndarray:
                # One new token per call: feed it alone with the cached keys and values.
                ids = torch.from_numpy(prefixes).to(ws.device)
                if "past" in cache:
                    ids = ids[:, -1:]
                out = ws.model(input_ids=ids, cache=cache.get("past"), use_cache=True)
                cache["past"] = out.cache
                return torch.softmax(out.logits[:, -1].float(), dim=-1).cpu().numpy()

            with _base_only(ws), torch.no_grad():
                tokens, included = make_canaries(
                    self.ledger.canary_seed(spec.run_uid), key[1], key[2],
                    int(ws.model.config.vocab_size), next_token_probs,
                )  # fmt: skip
            self._canary_cache[key] = (torch.from_numpy(tokens), included)
        return self._canary_cache[key]

    def _training_rows(self, spec: RoundSpec, ws: Workspace) -> torch.Tensor:
        """What this round trains on: records under record-level DP, packed blocks otherwise;
        with the run's included audit canaries among them (records like any other)."""
        rows = ws.train_records if spec.privacy.record else ws.train_blocks
        if spec.privacy.audit is None:
            return rows
        canaries, included = self._canaries(spec, ws)
        return torch.cat([rows, canaries[torch.from_numpy(included)]])

    def _prepare(self, config: dict) -> tuple[RoundSpec, Workspace, PrivacyPlan]:
        """The round as asked, checked in an order that keeps refusals free of the node's data:
        first public values and the node's own terms, then the one fixed condition on its data
        (its delta against its record count, the same answer every time), and only then the
        plan, which can then no longer fail on the record count."""
        spec = RoundSpec.from_config(config)
        ws = workspace(self.node, spec.lora, spec.train.seq_len, spec.base)
        _check_round(ws, spec)
        if spec.aggregation == "expert-weighted" and spec.privacy.record:
            # The counts go out clipped and noised with the update only at enterprise level.
            raise RoundRefused(
                "asked for expert-weighted aggregation in a run with record-level privacy: the "
                "routing counts it releases are not covered by DP-SGD"
            )
        own = self.node.budget.delta
        for level in ("record", "enterprise"):
            settings = getattr(spec.privacy, level)
            laplace = level == "enterprise" and settings and settings.mechanism == "laplace"
            if settings is not None and not laplace and settings.delta > own:
                raise RoundRefused(
                    f"the run's {level}-level delta {settings.delta:g} is above this node's delta {own:g}"
                )
        records = 0
        if spec.privacy.record:  # only record-level DP needs the count (delta, expected batch)
            records = self._training_rows(spec, ws).shape[0]
            most = ws.train_records.shape[0] + (
                spec.privacy.audit.canaries if spec.privacy.audit else 0
            )
            if not own < 1.0 / most:
                raise RoundRefused(
                    f"this node's delta {own:g} (budget.delta) is not below 1/records of its own "
                    "data: lower it in the node's terms"
                )
            bound = spec.privacy.record.min_records
            if bound is not None and ws.train_records.shape[0] < bound:
                # The run's forecast assumed at least `bound` records; the answer is the same
                # every time and says only that this node is below the public bound.
                raise RoundRefused(
                    f"this node holds fewer training records than the run's public bound "
                    f"privacy.record.min_records = {bound}"
                )
        plan = _privacy_plan(
            spec.privacy.model_dump_json(), records, spec.train.local_steps, spec.rounds
        )
        return spec, ws, plan

    def _epsilon_after(self, plan: PrivacyPlan):
        """The plan's epsilon at THIS node's delta, from the noise the node adds itself."""
        return lambda level, releases: plan.epsilon_after(level, releases, self.node.budget.delta)

    def budget(self, config: dict) -> dict:
        """The budget handshake before each round: would this round fit this node's budget?"""
        try:
            spec, _, plan = self._prepare(config)
        except (InfeasiblePlan, RoundRefused) as err:
            reason = str(err)
            if isinstance(err, InfeasiblePlan):
                reason = f"infeasible privacy plan on this node: {reason}"
            self.refusals.note(reason)
            return BudgetAnswer(
                accept=False, reason=reason, enterprise=self.node.enterprise
            ).to_properties()
        except MalformedRound:
            raise
        except Exception as err:  # noqa: BLE001 - any other failure fails the round, by name
            # Before any charge and from the node's own setup (model, data, round config).
            reason = f"{type(err).__name__}: {str(err)[:500]}"
            return BudgetAnswer(
                accept=False, reason=reason, enterprise=self.node.enterprise, failed=True
            ).to_properties()
        spends, problem = self.ledger.preview(
            spec.ledger_key(),
            spec.server_round,
            self._epsilon_after(plan),
            self.budgets,
            spec.rounds,
        )
        if problem is not None:
            self.refusals.note(problem)
        epsilons = {f"epsilon_{s.level}": s.epsilon_run for s in spends}
        answer = BudgetAnswer(
            accept=problem is None,
            reason=problem or "",
            enterprise=self.node.enterprise,
            **epsilons,
        )
        return answer.to_properties()

    def _secure_terms(
        self, spec: RoundSpec, secure_sum: SecureSum | None
    ) -> tuple[int, float | None, str]:
        """(how many clients' noise shares make the full noise, the SecAgg+ value range, the
        session the release goes into), from what the node itself joined; the round config must
        agree. A noise share only in a session of verified, pinned peers (client/secagg_guard.py)."""
        if secure_sum is None:
            if spec.noise_shares > 1:  # only a sum hides a share-sized noise
                raise RoundRefused(
                    f"asked to add 1/{spec.noise_shares} of the noise, but this update is not under secure aggregation"
                )
            return 1, None, CLEAR
        if spec.noise_shares != secure_sum.threshold:
            raise RoundRefused(
                f"the round config splits the noise in {spec.noise_shares} shares, but the SecAgg+ "
                f"setup unmasks sums of {secure_sum.threshold} or more clients"
            )
        if spec.secagg_range is not None and spec.secagg_range != secure_sum.clipping_range:
            raise RoundRefused(
                f"the round config's SecAgg+ range {spec.secagg_range:g} is not the SecAgg+ "
                f"setup's clipping range {secure_sum.clipping_range:g}"
            )
        trusted = secure_sum.verified and not self.node.budget.full_noise
        shares = secure_sum.threshold if trusted else 1
        return shares, secure_sum.clipping_range, secure_sum.session

    def fit(
        self, parameters: list[np.ndarray], config: dict, secure_sum: SecureSum | None
    ) -> tuple[list[np.ndarray], int, dict]:
        """Train on the global adapter and return (released update, weight, metrics).

        `secure_sum`: the SecAgg+ session this update goes into (None: sent in the clear).
        Everything before the charge depends only on public values and the node's own terms;
        after it, the round's one draw ends released or failed on the ledger, never retried."""
        try:
            return self._fit(parameters, config, secure_sum)
        except (BudgetExceeded, ReplayRefused, RoundRefused) as err:
            self.refusals.note(str(err))
            raise

    def _fit(
        self, parameters: list[np.ndarray], config: dict, secure_sum: SecureSum | None
    ) -> tuple[list[np.ndarray], int, dict]:
        started = time.monotonic()
        spec, ws, plan = self._prepare(config)
        shares, value_range, session = self._secure_terms(spec, secure_sum)
        key, sha = spec.ledger_key(), parameters_sha256(parameters)
        if (earlier := self.ledger.draw(key, spec.server_round)) is not None:
            return self._replay(spec, earlier, sha, session)
        global_vector = _global_adapter(parameters, ws)  # a malformed adapter: refused, uncharged
        self.ledger.name_run(spec.run_uid, spec.run_number)
        # Write-ahead: spend and draw are on the ledger before any training.
        spends = self.ledger.charge(
            key, spec.server_round, self._epsilon_after(plan), self.budgets, spec.rounds,
            session=session, parameters_sha256=sha,
        )  # fmt: skip
        try:
            release = self._draw(spec, ws, plan, global_vector, shares, value_range, secure_sum)
        except ReleaseRefused as err:
            self.ledger.failed(key, spec.server_round, str(err))
            raise RoundFailed(str(err)) from None
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            if spec.privacy.enabled:  # the details may say something of the data: kept here
                print(f"[fedmoe node] round {spec.server_round} failed: {reason}", flush=True)
                reason = f"round {spec.server_round} failed on this node after its charge (details in the node's log)"
            self.ledger.failed(key, spec.server_round, reason)
            raise RoundFailed(reason) from None
        release.metrics.update({f"epsilon_{s.level}": s.epsilon_run for s in spends})
        if not spec.privacy.enabled and secure_sum is None:  # a public run in the clear
            release.metrics["duration_s"] = time.monotonic() - started
        self.ledger.released(key, spec.server_round, release)  # before anything leaves
        if plan.record is not None:
            self._hold_reply(started)
        return release.arrays, release.weight, release.metrics

    def _draw(
        self,
        spec: RoundSpec,
        ws: Workspace,
        plan: PrivacyPlan,
        global_vector: np.ndarray,
        shares: int,
        value_range: float | None,
        secure_sum: SecureSum | None,
    ) -> Release:
        """The round's one draw: train (plain or DP-SGD), privatize, check what would leave."""
        private = spec.privacy.enabled
        metrics: dict = {"enterprise": self.node.enterprise}
        if spec.measure_baseline and not private and secure_sum is None:
            metrics["heldout_loss_before"] = evaluate_loss(
                ws.model, ws.heldout_records, spec.train.eval_batch_size, ws.device
            )
            metrics["heldout_examples"] = int(ws.heldout_records.shape[0])
        rows = self._training_rows(spec, ws)
        if plan.record is not None:
            record = spec.privacy.record
            result = train_local_private(
                ws.model, rows, spec.train, plan.record, record.clip,
                record.max_physical_batch_size, ws.device,
            )  # fmt: skip
        else:
            seed = (
                spec.train.seed * 1_000_003
                + spec.server_round * 1009
                + _enterprise_seed(self.node.enterprise)
            )
            result = train_local(ws.model, rows, spec.train, seed=seed, device=ws.device)
        delta = [get_adapter_vector(ws.model) - global_vector]
        norm = l2_norm(delta)
        if not (np.isfinite(norm) and norm > 0.0):
            problem = (
                "the adapter update is not finite; lower train.lr"
                if not np.isfinite(norm)
                else "local training left the adapter unchanged: nothing would be learned"
            )
            if plan.enterprise is None:  # no privacy, or after DP-SGD: a check on its output
                raise ReleaseRefused(problem)
            # Before the noise, whether the update failed is a bit about the data that no DP
            # covers: it leaves as a zero update (within the clip), noised like any other.
            print(
                f"[fedmoe node] round {spec.server_round}: {problem}; sent noise only", flush=True
            )
            delta, norm = [np.zeros_like(delta[0])], 0.0
        weighted = spec.aggregation == "expert-weighted"
        if weighted:  # before the clip and noise: the counts are part of the release
            delta = [_expert_weighted(delta[0], ws, spec, result.expert_load)]
        if plan.enterprise is not None:
            delta, _ = privatize_update(delta, plan.enterprise, shares)
        if value_range is not None and max(float(np.abs(d).max()) for d in delta) > value_range:
            # Secure aggregation would silently clip it: refuse to send a corrupted update.
            raise ReleaseRefused(
                f"an update value exceeds the secure-aggregation range {value_range:g}; "
                "clip updates (privacy.enterprise) or raise federation.secure_aggregation.value_range"
            )
        if private or secure_sum is not None:
            # Only the (privatized, or masked) delta and its accounting leave: no loss, norm,
            # expert load, step count or timing (which tracks the Poisson batch sizes and the
            # data's size); weight 1: under DP the sensitivity analysis bounds each enterprise's
            # share, under SecAgg+ the masked values would be scaled by it.
            return Release(delta, 1, metrics)
        metrics.update(
            train_loss=result.mean_loss,
            update_norm=norm,
            steps=result.steps,
            expert_load=json.dumps(result.expert_load),
        )
        # FedAvg weight: the enterprise's number of training sequences (expert-weighted
        # aggregation weighs the experts by their token counts instead).
        return Release(delta, 1 if weighted else int(rows.shape[0]), metrics)

    def _hold_reply(self, started: float) -> None:
        """Under record-level DP the fit time tracks the data's size (the Poisson batches):
        hold the reply until `fit_reply_s` after the fit began, the same for every round."""
        hold = self.node.fit_reply_s
        if hold is None:
            if not self._warned_timing:
                print(
                    "[fedmoe node] record-level DP: this reply's timing grows with the data's "
                    "size; set fit_reply_s to send every reply at a fixed time",
                    flush=True,
                )
                self._warned_timing = True
            return
        left = started + hold - time.monotonic()
        if left < 0:
            print(
                f"[fedmoe node] training took {hold - left:.1f}s, longer than fit_reply_s={hold:g}: "
                "this reply's timing tells its size; raise fit_reply_s",
                flush=True,
            )
        time.sleep(max(0.0, left))

    def _replay(
        self, spec: RoundSpec, earlier: Draw, sha: str, session: str
    ) -> tuple[list[np.ndarray], int, dict]:
        """A round asked again (a resumed coordinator, or any other): its one draw, never a new one."""
        where = f"round {spec.server_round} of run {spec.run_uid[:8]}"
        latest = self.ledger.latest_round(spec.ledger_key())
        if latest is not None and latest > spec.server_round:
            raise ReplayRefused(
                f"{where} comes after round {latest} on this node: rounds only go forward"
            )
        if earlier.status == "failed":
            raise RoundFailed(earlier.reason or f"{where} failed on this node")
        if earlier.status != "released":
            raise ReplayRefused(
                f"{where} was charged and its draw is under way or was cut short; one draw per charge"
            )
        if earlier.parameters_sha256 != sha:
            raise ReplayRefused(
                f"{where} was already released from another global adapter; one release per round"
            )
        if earlier.session != session or session != CLEAR:
            raise ReplayRefused(
                f"{where} was already released into another "
                f"{'secure-aggregation session' if earlier.session != CLEAR else 'channel (in the clear)'}; "
                "a release goes into one session only"
            )
        return earlier.release.arrays, earlier.release.weight, earlier.release.metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        """Held-out loss on the coordinator's adapter (never in a private run), and with
        `spec.audit` the one-run audit's counts (in any run: a function of the adapter and of
        canaries, not of the enterprise's records)."""
        spec = RoundSpec.from_config(config)
        # Whatever this message says of the run's privacy, the node's ledger knows whether it
        # trained privately in it.
        private = (
            spec.privacy.enabled
            or self.node.budget.limited
            or self.ledger.trained_privately(spec.run_uid)
        )
        if private and not spec.audit:
            raise PermissionError(
                "this node releases no held-out metrics in a private run (they are not covered by the privacy budget)"
            )
        ws = workspace(self.node, spec.lora, spec.train.seq_len, spec.base)
        _check_round(ws, spec)
        _global_adapter(parameters, ws)
        metrics: dict = {"enterprise": self.node.enterprise}
        if spec.audit:
            metrics.update(self._audit_counts(spec, ws))
        if private:
            return math.nan, 0, metrics
        loss = evaluate_loss(ws.model, ws.heldout_records, spec.train.eval_batch_size, ws.device)
        return loss, int(ws.heldout_records.shape[0]), metrics

    def _audit_counts(self, spec: RoundSpec, ws: Workspace) -> dict:
        """Guess which canaries the adapter was trained on; only the counts leave the node."""
        audit = spec.privacy.audit
        if audit is None:
            raise RoundRefused("asked for an audit in a run without [privacy.audit]")
        canaries, included = self._canaries(spec, ws)
        ws.model.eval()
        with torch.no_grad():
            trained = _sequence_losses(ws, canaries, spec.train.eval_batch_size)
            with _base_only(ws):
                base = _sequence_losses(ws, canaries, spec.train.eval_batch_size)
        # How much training lowered each canary's loss: the base's own preferences cancel out.
        per_side = max(1, round(audit.canaries * audit.guess_fraction / 2))
        guesses, correct = score_guesses(trained - base, included, per_side)
        return {
            "audit_canaries": audit.canaries,
            "audit_guesses": guesses,
            "audit_correct": correct,
        }

"""Flower ClientApp: an enterprise node's side of a round.

Built on the legacy NumPyClient because that is the path through which Flower's SecAgg+ runs
(`secaggplus_mod`); one code path serves runs with and without secure aggregation.

A node learns where its data and model live from its node config (`--node-config
'enterprise=acme data-path=/data/acme model-path=/models/base'`). On Flower's simulation engine
there is one node config per partition, so the launcher passes a list of enterprises in the run
config and partition i takes entry i.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedmoe.client.dp_trainer import train_local_private
from fedmoe.client.ledger import PrivacyLedger
from fedmoe.client.settings import LocalTrainSettings, NodeSettings
from fedmoe.client.trainer import evaluate_loss, train_local
from fedmoe.model.base import fingerprint, load_base, load_tokenizer
from fedmoe.model.data import find_split, load_blocks, load_records
from fedmoe.model.lora import LoraSettings, adapter_layout, attach_lora, get_adapter_tensors, set_adapter_tensors
from fedmoe.privacy.mechanisms import l2_norm
from fedmoe.privacy.plan import InfeasiblePlan, PrivacyPlan, plan_run, privatize_update
from fedmoe.privacy.settings import NodeBudget, PrivacySettings


def _optional_float(value) -> float | None:
    return None if value in (None, "") else float(value)


def node_settings(context: Context) -> NodeSettings:
    """This node's settings: from its node config (deployment) or its simulation partition."""
    node = context.node_config
    if "data-path" in node:
        return NodeSettings(
            enterprise=str(node.get("enterprise", f"node-{context.node_id}")),
            data_dir=str(node["data-path"]),
            model_path=str(node.get("model-path", "embedded")),
            threads=int(node.get("threads", 1)),
            device=str(node.get("device", "auto")),
            budget=NodeBudget(
                record_epsilon=_optional_float(node.get("budget-record-epsilon")),
                enterprise_epsilon=_optional_float(node.get("budget-enterprise-epsilon")),
            ),
            ledger=node.get("ledger-path") or None,
        )
    run = context.run_config
    if "sim-enterprises" not in run or "partition-id" not in node:
        raise ValueError("node config needs 'data-path' (and usually 'enterprise', 'model-path'); see the README's deployment section")
    enterprises = json.loads(str(run["sim-enterprises"]))
    partition = int(node["partition-id"])
    if not 0 <= partition < len(enterprises):
        raise ValueError(f"partition-id {partition} outside the {len(enterprises)} configured enterprises")
    entry = enterprises[partition]
    return NodeSettings(
        enterprise=entry["name"],
        data_dir=entry["data"],
        model_path=str(run["model-path"]),
        threads=int(run.get("threads-per-client", 1)),
        budget=NodeBudget.model_validate(entry.get("budget") or {}),
        ledger=entry.get("ledger"),
    )


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
    heldout_blocks: torch.Tensor
    device: torch.device
    seq_len: int

    @property
    def train_records(self) -> torch.Tensor:
        """One training record per row, for record-level DP."""
        return _records(str(self.node.data_dir), self.node.model_path, self.seq_len)


@lru_cache(maxsize=2)
def _adapted_model(model_path: str, lora_json: str, device: str) -> tuple[torch.nn.Module, str, str]:
    base = load_base(model_path)
    base_fp = fingerprint(base)
    model = attach_lora(base, LoraSettings.model_validate_json(lora_json)).to(device)
    return model, base_fp, adapter_layout(model)


@lru_cache(maxsize=8)
def _blocks(data_dir: str, split: str, model_path: str, seq_len: int) -> torch.Tensor:
    return load_blocks(find_split(Path(data_dir), split), load_tokenizer(model_path), seq_len)


@lru_cache(maxsize=4)
def _records(data_dir: str, model_path: str, seq_len: int) -> torch.Tensor:
    return load_records(find_split(Path(data_dir), "train"), load_tokenizer(model_path), seq_len)


def workspace(node: NodeSettings, lora_json: str, seq_len: int) -> Workspace:
    torch.set_num_threads(node.threads)
    device = pick_device(node.device)
    model, base_fp, layout = _adapted_model(node.model_path, lora_json, str(device))
    return Workspace(
        node=node,
        model=model,
        base_fingerprint=base_fp,
        layout=layout,
        train_blocks=_blocks(str(node.data_dir), "train", node.model_path, seq_len),
        heldout_blocks=_blocks(str(node.data_dir), "heldout", node.model_path, seq_len),
        device=device,
        seq_len=seq_len,
    )


@dataclass(frozen=True)
class RoundSpec:
    """What the coordinator asks of this round (sent in every round's config)."""

    number: int
    train: LocalTrainSettings
    privacy: PrivacySettings
    rounds: int
    noise_shares: int
    secagg_range: float | None

    @classmethod
    def from_config(cls, config: dict) -> "RoundSpec":
        return cls(
            number=int(config["server_round"]),
            train=LocalTrainSettings.model_validate_json(str(config["train"])),
            privacy=PrivacySettings.model_validate_json(str(config.get("privacy", "{}"))),
            rounds=int(config["rounds"]),
            noise_shares=int(config.get("noise_shares", 1)),
            secagg_range=float(config["secagg_range"]) if "secagg_range" in config else None,
        )

    def ledger_key(self, run_id: int) -> str:
        """The node's ledger key for this run: a different plan under the same run id is a different
        run, so a coordinator cannot change the noise mid-run and keep the tight within-run accounting."""
        plan = json.dumps([self.privacy.model_dump(), self.rounds, self.train.local_steps, self.train.batch_size], sort_keys=True)
        return f"{run_id}:{hashlib.sha256(plan.encode()).hexdigest()[:16]}"


@lru_cache(maxsize=16)
def _privacy_plan(privacy_json: str, records: int, batch_size: int, steps: int, rounds: int) -> PrivacyPlan:
    return plan_run(PrivacySettings.model_validate_json(privacy_json), records, batch_size, steps, rounds)


def _check_round_config(ws: Workspace, config: dict) -> None:
    if config["base_fingerprint"] != ws.base_fingerprint:
        raise RuntimeError(
            f"base model mismatch: the coordinator trains base {str(config['base_fingerprint'])[:12]}, this node has {ws.base_fingerprint[:12]}; "
            "point model-path at the same checkpoint"
        )
    if config["adapter_layout"] != ws.layout:
        raise RuntimeError("adapter layout mismatch between coordinator and node (different fedmoe versions or LoRA settings)")


def _to_tensors(parameters: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(p)) for p in parameters]


class EnterpriseClient(NumPyClient):
    """One enterprise's agent: checks its own privacy budget, trains, privatizes, releases a delta."""

    def __init__(self, node: NodeSettings, partition_seed: int, run_id: int = 0, under_secure_aggregation: bool = False):
        self.node = node
        self.under_secure_aggregation = under_secure_aggregation
        self.partition_seed = partition_seed
        self.run_id = run_id
        self.ledger = PrivacyLedger(node.ledger_path)
        self.budgets = {"record": node.budget.record_epsilon, "enterprise": node.budget.enterprise_epsilon}

    def _prepare(self, config: dict) -> tuple[RoundSpec, Workspace, PrivacyPlan]:
        spec = RoundSpec.from_config(config)
        ws = workspace(self.node, str(config["lora"]), spec.train.seq_len)
        _check_round_config(ws, config)
        records = ws.train_records.shape[0] if spec.privacy.record else 0  # only record-level DP needs it
        plan = _privacy_plan(spec.privacy.model_dump_json(), records, spec.train.batch_size, spec.train.local_steps, spec.rounds)
        return spec, ws, plan

    def get_properties(self, config):
        """The budget handshake before each round: would this round fit this node's budget?"""
        try:
            spec, _, plan = self._prepare(config)
        except InfeasiblePlan as err:
            return {"enterprise": self.node.enterprise, "accept": False, "reason": f"infeasible privacy plan on this node: {err}"}
        spends, problem = self.ledger.preview(spec.ledger_key(self.run_id), plan.epsilon_after, self.budgets, spec.rounds)
        answer = {"enterprise": self.node.enterprise, "accept": problem is None, "reason": problem or ""}
        for spend in spends:
            answer[f"epsilon_{spend.level}"] = spend.epsilon_run
            answer[f"lifetime_{spend.level}"] = spend.lifetime
        return answer

    def fit(self, parameters, config):
        started = time.perf_counter()
        spec, ws, plan = self._prepare(config)
        if spec.noise_shares > 1 and not self.under_secure_aggregation:
            # Only a sum hides a share-sized noise: never send one in the clear.
            raise RuntimeError(f"asked to add 1/{spec.noise_shares} of the noise, but this update is not under secure aggregation")
        # Write-ahead: the spend is on the node's ledger before any training (raises BudgetExceeded).
        spends = self.ledger.charge(spec.ledger_key(self.run_id), spec.number, plan.epsilon_after, self.budgets, spec.rounds)
        global_tensors = _to_tensors(parameters)
        set_adapter_tensors(ws.model, global_tensors)
        private = spec.privacy.enabled
        metrics: dict = {"enterprise": self.node.enterprise}
        if config.get("measure_baseline") and not private:
            metrics["heldout_loss_before"] = evaluate_loss(ws.model, ws.heldout_blocks, spec.train.eval_batch_size, ws.device)
        if plan.record is not None:
            record = spec.privacy.record
            result = train_local_private(ws.model, ws.train_records, spec.train, plan.record, record.clip, record.max_physical_batch_size, ws.device)
        else:
            seed = spec.train.seed * 1_000_003 + spec.number * 1009 + self.partition_seed
            result = train_local(ws.model, ws.train_blocks, spec.train, seed=seed, device=ws.device)
        delta = [(new.cpu() - old.to(new.dtype)).float().numpy() for new, old in zip(get_adapter_tensors(ws.model), global_tensors)]
        norm = l2_norm(delta)
        if not np.isfinite(norm):
            raise FloatingPointError("the adapter update is not finite; lower train.lr")
        if norm == 0.0:
            raise RuntimeError("local training left the adapter unchanged: nothing would be learned")
        if plan.enterprise is not None:
            delta, _ = privatize_update(delta, plan.enterprise, spec.noise_shares)
        if spec.secagg_range is not None and max(float(np.abs(d).max()) for d in delta) > spec.secagg_range:
            # Secure aggregation would silently clip it: refuse to send a corrupted update.
            raise ValueError(
                f"an update value exceeds the secure-aggregation range {spec.secagg_range:g}; "
                "clip updates (privacy.enterprise) or raise federation.secure_aggregation.value_range"
            )
        metrics.update(steps=result.steps, duration_s=time.perf_counter() - started)
        metrics.update({f"epsilon_{s.level}": s.epsilon_run for s in spends})
        if private:
            # Only the privatized delta leaves: no loss, norm, expert load or record count of the data;
            # weight 1 because the sensitivity analysis bounds each enterprise's share of the average.
            return delta, 1, metrics
        metrics.update(train_loss=result.mean_loss, update_norm=norm, expert_load=json.dumps(result.expert_load))
        # FedAvg weight: the enterprise's number of training sequences (SecAgg+ would scale the
        # masked values by it, so there every client weighs 1).
        return delta, 1 if spec.secagg_range is not None else int(ws.train_blocks.shape[0]), metrics

    def evaluate(self, parameters, config):
        spec = RoundSpec.from_config(config)
        if spec.privacy.enabled or self.node.budget.limited:
            raise PermissionError("this node releases no held-out metrics in a private run (they are not covered by the privacy budget)")
        ws = workspace(self.node, str(config["lora"]), spec.train.seq_len)
        _check_round_config(ws, config)
        set_adapter_tensors(ws.model, _to_tensors(parameters))
        loss = evaluate_loss(ws.model, ws.heldout_blocks, spec.train.eval_batch_size, ws.device)
        return loss, int(ws.heldout_blocks.shape[0]), {"enterprise": self.node.enterprise}


SECAGG_FLAG = "fedmoe.secure-aggregation"


def optional_secaggplus_mod(msg, context, call_next):
    """Flower's SecAgg+ client mod, only for runs whose coordinator uses secure aggregation
    (the bare mod fails every fit of a run without it). It also tells the client whether THIS
    message is under SecAgg+, so a node adds only a share of the noise when it really is."""
    active = RECORD_KEY_CONFIGS in msg.content.config_records
    context.state.config_records[SECAGG_FLAG] = ConfigRecord({"active": active})
    return secaggplus_mod(msg, context, call_next) if active else call_next(msg, context)


def client_fn(context: Context):
    node = node_settings(context)
    flag = context.state.config_records.get(SECAGG_FLAG)
    return EnterpriseClient(
        node,
        partition_seed=int(context.node_config.get("partition-id", 0)),
        run_id=context.run_id,
        under_secure_aggregation=bool(flag and flag["active"]),
    ).to_client()


app = ClientApp(client_fn=client_fn, mods=[optional_secaggplus_mod])

"""Flower ClientApp: an enterprise node's side of a round.

Built on the legacy NumPyClient because that is the path through which Flower's SecAgg+ runs
(`secaggplus_mod`); one code path serves runs with and without secure aggregation.

A node learns where its data and model live from its node config (`--node-config
'enterprise=acme data-path=/data/acme model-path=/models/base'`). On Flower's simulation engine
there is one node config per partition, so the launcher passes a list of enterprises in the run
config and partition i takes entry i.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient

from fedmoe.client.settings import LocalTrainSettings, NodeSettings
from fedmoe.client.trainer import evaluate_loss, train_local
from fedmoe.model.base import fingerprint, load_base, load_tokenizer
from fedmoe.model.data import find_split, load_blocks
from fedmoe.model.lora import LoraSettings, adapter_layout, attach_lora, get_adapter_tensors, set_adapter_tensors


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
        enterprise=entry["name"], data_dir=entry["data"], model_path=str(run["model-path"]), threads=int(run.get("threads-per-client", 1))
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

    model: torch.nn.Module
    base_fingerprint: str
    layout: str
    train_blocks: torch.Tensor
    heldout_blocks: torch.Tensor
    device: torch.device


@lru_cache(maxsize=2)
def _adapted_model(model_path: str, lora_json: str, device: str) -> tuple[torch.nn.Module, str, str]:
    base = load_base(model_path)
    base_fp = fingerprint(base)
    model = attach_lora(base, LoraSettings.model_validate_json(lora_json)).to(device)
    return model, base_fp, adapter_layout(model)


@lru_cache(maxsize=8)
def _blocks(data_dir: str, split: str, model_path: str, seq_len: int) -> torch.Tensor:
    return load_blocks(find_split(Path(data_dir), split), load_tokenizer(model_path), seq_len)


def workspace(node: NodeSettings, lora_json: str, seq_len: int) -> Workspace:
    torch.set_num_threads(node.threads)
    device = pick_device(node.device)
    model, base_fp, layout = _adapted_model(node.model_path, lora_json, str(device))
    return Workspace(
        model=model,
        base_fingerprint=base_fp,
        layout=layout,
        train_blocks=_blocks(str(node.data_dir), "train", node.model_path, seq_len),
        heldout_blocks=_blocks(str(node.data_dir), "heldout", node.model_path, seq_len),
        device=device,
    )


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
    def __init__(self, node: NodeSettings, partition_seed: int):
        self.node = node
        self.partition_seed = partition_seed

    def fit(self, parameters, config):
        started = time.perf_counter()
        train = LocalTrainSettings.model_validate_json(str(config["train"]))
        ws = workspace(self.node, str(config["lora"]), train.seq_len)
        _check_round_config(ws, config)
        global_tensors = _to_tensors(parameters)
        set_adapter_tensors(ws.model, global_tensors)
        metrics: dict = {"enterprise": self.node.enterprise}
        if config.get("measure_baseline"):
            metrics["heldout_loss_before"] = evaluate_loss(ws.model, ws.heldout_blocks, train.eval_batch_size, ws.device)
        seed = train.seed * 1_000_003 + int(config["server_round"]) * 1009 + self.partition_seed
        result = train_local(ws.model, ws.train_blocks, train, seed=seed, device=ws.device)
        delta = [(new.cpu() - old.to(new.dtype)).float() for new, old in zip(get_adapter_tensors(ws.model), global_tensors)]
        norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta)))
        if not np.isfinite(norm):
            raise FloatingPointError("the adapter update is not finite; lower train.lr")
        if norm == 0.0:
            raise RuntimeError("local training left the adapter unchanged: nothing would be learned")
        metrics.update(
            train_loss=result.mean_loss,
            steps=result.steps,
            update_norm=norm,
            duration_s=time.perf_counter() - started,
            expert_load=json.dumps(result.expert_load),
        )
        # FedAvg weight: the enterprise's number of training sequences.
        return [d.numpy() for d in delta], int(ws.train_blocks.shape[0]), metrics

    def evaluate(self, parameters, config):
        train = LocalTrainSettings.model_validate_json(str(config["train"]))
        ws = workspace(self.node, str(config["lora"]), train.seq_len)
        _check_round_config(ws, config)
        set_adapter_tensors(ws.model, _to_tensors(parameters))
        loss = evaluate_loss(ws.model, ws.heldout_blocks, train.eval_batch_size, ws.device)
        return loss, int(ws.heldout_blocks.shape[0]), {"enterprise": self.node.enterprise}


def client_fn(context: Context):
    node = node_settings(context)
    return EnterpriseClient(node, partition_seed=int(context.node_config.get("partition-id", 0))).to_client()


app = ClientApp(client_fn=client_fn)

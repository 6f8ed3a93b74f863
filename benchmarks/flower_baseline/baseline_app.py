"""Baseline: the usual Flower + peft recipe. FedAvg of full LoRA weights over the new Message API,
peft LoRA (r=16, alpha=32) on the attention projections, HF's `labels=` loss, and, as in Flower's
LLM examples, the model loaded inside each train/evaluate call."""

import json
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedmoe.model.data import find_split, load_blocks

TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def build(model_path):
    base = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
    return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))


def blocks(context, split):
    cfg = context.run_config
    data_dir = json.loads(cfg["data-dirs"])[int(context.node_config["partition-id"])]
    tok = AutoTokenizer.from_pretrained(cfg["model-path"], local_files_only=True)
    return load_blocks(find_split(data_dir, split), tok, int(cfg["seq-len"]))


client = ClientApp()


@client.train()
def train(msg: Message, context: Context):
    torch.set_num_threads(1)
    cfg = context.run_config
    model = build(cfg["model-path"])
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    data = blocks(context, "train")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(cfg["lr"]))
    model.train()
    for _ in range(int(cfg["local-steps"])):
        batch = data[torch.randint(0, data.shape[0], (int(cfg["batch-size"]),))]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": data.shape[0], "train_loss": loss.item()})})
    return Message(content=content, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context):
    torch.set_num_threads(1)
    model = build(context.run_config["model-path"])
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    data = blocks(context, "heldout")
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=data, labels=data).loss.item()
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": data.shape[0], "eval_loss": loss})}), reply_to=msg)


class TimedFedAvg(FedAvg):
    """FedAvg that notes when each round starts (configure_train) and ends (aggregate_evaluate)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.rounds = []

    def configure_train(self, server_round, arrays, config, grid):
        self.rounds.append({"round": server_round, "start": time.time()})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        out = super().aggregate_evaluate(server_round, replies)
        self.rounds[-1]["end"] = time.time()
        return out


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n = len(json.loads(cfg["data-dirs"]))
    initial = ArrayRecord({k: v.detach() for k, v in get_peft_model_state_dict(build(cfg["model-path"])).items()})
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(cfg["rounds"]))
    with open(cfg["timings-path"], "w") as f:
        json.dump(strategy.rounds, f)

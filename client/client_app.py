"""Flower ClientApp: the glue between Flower's messages and an enterprise node.

One ClientApp, two homes. On the deployment engine the agent runs it in its own process, on its
warm `EnterpriseNode` (client/executor.py: Flower's per-message processes and the coordinator's
FAB code never run on the node). On the simulation engine Flower loads `app` below, which builds
the simulated enterprise's node from the run config (each Ray actor keeps it warm).

Built on the legacy NumPyClient because that is the path through which Flower's SecAgg+ runs
(`secaggplus_mod`); one code path serves runs with and without secure aggregation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache

from flwr.app import ConfigRecord, Context
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat

from fedmoe.contract import secagg_transport
from fedmoe.contract.round import RoundSpec, SecureSum
from fedmoe.privacy import secagg_prg

SECAGG_FLAG = "fedmoe.secure-aggregation"
SECAGG_SETUP = "fedmoe.secagg-setup"
SECAGG_ROUND = "fedmoe.secagg-round"


class NodeClient(NumPyClient):
    def __init__(self, node, secure_sum: SecureSum | None):
        self.node = node
        self.secure_sum = secure_sum

    def get_properties(self, config):
        return self.node.budget(dict(config))

    def fit(self, parameters, config):
        return self.node.fit(parameters, dict(config), self.secure_sum)

    def evaluate(self, parameters, config):
        return self.node.evaluate(parameters, dict(config))


def build_client_app(node_for: Callable[[Context], object]) -> ClientApp:
    """The ClientApp of the node `node_for(context)` returns (an `EnterpriseNode`)."""

    def optional_secaggplus_mod(msg, context, call_next):
        """Flower's SecAgg+ client mod, only for runs whose coordinator uses secure aggregation
        (the bare mod fails every fit of a run without it), with masks from the whole shared key
        (privacy/secagg_prg.py). It also tells the node whether THIS message is under SecAgg+ and
        what the SecAgg+ setup said (threshold, clipping range: the node sizes its noise share by
        them, never by the round config), and before this node helps unmask a sum, records that
        its release for the round must never be sent again. Its masked vector travels as
        contract/secagg_transport.py packs it."""
        active = RECORD_KEY_CONFIGS in msg.content.config_records
        context.state.config_records[SECAGG_FLAG] = ConfigRecord({"active": active})
        if not active:
            return call_next(msg, context)
        secagg_prg.install()
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        stage = configs.get(Key.STAGE)
        if stage == Stage.SETUP:
            context.state.config_records[SECAGG_SETUP] = ConfigRecord(
                {"threshold": configs[Key.THRESHOLD], "clipping_range": configs[Key.CLIPPING_RANGE]}
            )
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            fit_ins = recorddict_compat.recorddict_to_fitins(msg.content, keep_input=True)
            spec = RoundSpec.from_config(fit_ins.config)
            context.state.config_records[SECAGG_ROUND] = ConfigRecord(
                {"run_key": spec.ledger_key(), "round": spec.server_round}
            )
        elif stage == Stage.UNMASK and SECAGG_ROUND in context.state.config_records:
            released = context.state.config_records[SECAGG_ROUND]
            node_for(context).mark_unmasked(str(released["run_key"]), int(released["round"]))
        reply = secaggplus_mod(msg, context, call_next)
        if reply.has_content():
            secagg_transport.pack(reply.content)  # the masked vector, in 5 MB chunks
        return reply

    def client_fn(context: Context):
        flag = context.state.config_records.get(SECAGG_FLAG)
        setup = context.state.config_records.get(SECAGG_SETUP)
        secure_sum = None
        if flag and flag["active"]:
            if setup is None:
                raise RuntimeError("a SecAgg+ round without its setup message reached this node")
            secure_sum = SecureSum(int(setup["threshold"]), float(setup["clipping_range"]))
        return NodeClient(node_for(context), secure_sum).to_client()

    return ClientApp(client_fn=client_fn, mods=[optional_secaggplus_mod])


@lru_cache(maxsize=64)
def _simulated_node(settings_json: str):
    from fedmoe.client.enterprise import EnterpriseNode
    from fedmoe.client.settings import NodeSettings

    return EnterpriseNode(NodeSettings.model_validate_json(settings_json))


def simulated_node(context: Context):
    """Simulation engine: partition i of the run's simulated enterprises (see coordinator/flower_run.py)."""
    run, node = context.run_config, context.node_config
    if "sim-enterprises" not in run or "partition-id" not in node:
        raise ValueError("this ClientApp runs on the simulation engine or inside `fedmoe agent`")
    enterprises = json.loads(str(run["sim-enterprises"]))
    partition = int(node["partition-id"])
    if not 0 <= partition < len(enterprises):
        raise ValueError(
            f"partition-id {partition} outside the {len(enterprises)} simulated enterprises"
        )
    return _simulated_node(json.dumps(enterprises[partition], sort_keys=True))


app = build_client_app(simulated_node)

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

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedmoe.client import secagg_guard as guard
from fedmoe.contract import secagg_session as wire
from fedmoe.contract import secagg_transport
from fedmoe.contract.round import SecureSum
from fedmoe.privacy import secagg_prg

SECAGG_FLAG = "fedmoe.secure-aggregation"


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


def named_errors(msg, context, call_next):
    """The simulation engine passes on only an exception's message (Ray wraps it in a
    ClientAppException): name its type there, as the deployment engine does, so the coordinator
    tells a node's refusal (BudgetExceeded, ReplayRefused, ...) from a failure."""
    try:
        return call_next(msg, context)
    except Exception as err:
        raise RuntimeError(f"{type(err).__name__}: {err}") from err


def build_client_app(node_for: Callable[[Context], object], outer_mods=()) -> ClientApp:
    """The ClientApp of the node `node_for(context)` returns (an `EnterpriseNode`)."""

    def optional_secaggplus_mod(msg, context, call_next):
        """Flower's SecAgg+ client mod, only for runs whose coordinator uses secure aggregation
        (the bare mod fails every fit of a run without it), with masks from the whole shared key
        (privacy/secagg_prg.py), behind the node's session guard (client/secagg_guard.py:
        verified peers, a consistency round, one unmask per session). It also tells the node
        whether THIS message is under SecAgg+ and which session its update goes into (the node
        sizes its noise share by what it verified, never by the round config). Its masked vector
        travels as contract/secagg_transport.py packs it."""
        active = RECORD_KEY_CONFIGS in msg.content.config_records
        context.state.config_records[SECAGG_FLAG] = ConfigRecord({"active": active})
        if not active or msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        secagg_prg.install()
        federation = node_for(context).federation
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        stage = configs.get(Key.STAGE)
        if stage == wire.CONSISTENCY:  # our own stage: Flower's mod never sees it
            signature = guard.sign_survivors(federation, context, configs)
            reply = RecordDict(
                {RECORD_KEY_CONFIGS: ConfigRecord({wire.SURVIVOR_SIGNATURE: signature})}
            )
            return Message(reply, reply_to=msg)
        if stage == Stage.SETUP:
            guard.on_setup(context, msg.metadata.dst_node_id, configs)
        elif stage == Stage.SHARE_KEYS:
            guard.join(federation, context, configs)
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            guard.collecting(context, configs)
        elif stage == Stage.UNMASK:
            guard.check_unmask(context, configs)
        reply = secaggplus_mod(msg, context, call_next)
        if reply.has_content():
            reply_configs = reply.content.config_records[RECORD_KEY_CONFIGS]
            if stage == Stage.SETUP:
                guard.sign_keys(federation, reply_configs, msg.metadata.dst_node_id)
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                guard.collected(context)
            secagg_transport.pack(reply.content)  # the masked vector, in 5 MB chunks
        return reply

    def client_fn(context: Context):
        flag = context.state.config_records.get(SECAGG_FLAG)
        secure_sum = guard.secure_sum(context) if flag and flag["active"] else None
        return NodeClient(node_for(context), secure_sum).to_client()

    return ClientApp(client_fn=client_fn, mods=[*outer_mods, optional_secaggplus_mod])


@lru_cache(maxsize=64)
def _simulated_node(settings_json: str):
    from fedmoe.client.enterprise import EnterpriseNode
    from fedmoe.client.settings import NodeSettings

    return EnterpriseNode(NodeSettings.model_validate_json(settings_json))


def simulated_node(context: Context):
    """Simulation engine: partition i of the run's simulated enterprises (see coordinator/round/flower_run.py)."""
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


app = build_client_app(simulated_node, outer_mods=[named_errors])

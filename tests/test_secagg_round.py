"""A whole SecAgg+ round through Flower's own protocol code, in one process: the coordinator's
SecAggPlusWorkflow against our ClientApp (with its SecAgg+ mod and the full-key mask generator of
privacy/secagg_prg.py) on every node, over a grid that delivers each stage's messages at once and
can lose nodes at any stage. The masks must cancel: the unmasked result is the average of the
updates that made it into the sum, whoever dropped out; with fewer survivors than the threshold
nothing is unmasked, and the fewest survivors' noise shares still make the full noise."""

from __future__ import annotations

import json
from copy import deepcopy
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import round_config
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WKey
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedmoe.client.client_app import build_client_app
from fedmoe.client.secagg_guard import Federation
from fedmoe.client.settings import NodeSettings
from fedmoe.contract import secagg_session as wire
from fedmoe.contract.round import RoundSpec
from fedmoe.contract.secagg_session import Identity
from fedmoe.contract.secagg_transport import MASKED, pack, unpack
from fedmoe.coordinator.config import load_run_config
from fedmoe.coordinator.round.flower_run import FlowerRun
from fedmoe.coordinator.round.secure_sum import SecureSumWorkflow
from fedmoe.privacy import secagg_prg
from fedmoe.privacy.plan import EnterprisePlan, privatize_update

SIZE = 64
RANGE = 4.0


IDENTITIES = {i: Identity.generate() for i in range(1, 11)}
PINNED = frozenset(identity.fingerprint for identity in IDENTITIES.values())


class _Node:
    """An enterprise node reduced to what SecAgg+ sees: a fixed update per node, and its
    identity in a federation that pins all ten."""

    def __init__(self, node_id: int):
        self.update = np.random.default_rng(node_id).uniform(-1, 1, SIZE).astype(np.float32)
        self.secure_sums = []
        self.federation = Federation(IDENTITIES[node_id], PINNED)

    def fit(self, parameters, config, secure_sum):
        self.secure_sums.append(secure_sum)
        assert RoundSpec.from_config(config).noise_shares == secure_sum.threshold
        return [self.update], 1, {}


class _Proxy(ClientProxy):
    def get_properties(self, *a, **k): ...
    def get_parameters(self, *a, **k): ...
    def fit(self, *a, **k): ...
    def evaluate(self, *a, **k): ...
    def reconnect(self, *a, **k): ...


class _Grid:
    """Delivers every message of a stage to its node's ClientApp; `lost[stage]` nodes never
    answer from that stage on."""

    def __init__(self, nodes: dict[int, _Node], lost: dict[str, set[int]]):
        self.nodes, self.lost, self.gone, self.received = nodes, lost, set(), []
        self.packed = []  # each masked vector as it crossed the wire
        self.app = build_client_app(lambda context: nodes[context.node_id])
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in nodes
        }

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            stage = message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            node = message.metadata.dst_node_id
            self.gone |= self.lost.get(stage, set())
            if node not in self.gone:  # each node gets its own copy, as over the wire
                reply = self.app(message=deepcopy(message), context=self.contexts[node])
                if MASKED in reply.content.array_records:
                    self.packed.append(reply.content.array_records[MASKED].to_numpy_ndarrays())
                unpack(reply.content)  # as the coordinator's grid does (coordinator/round/grid.py)
                replies.append(reply)
        self.received += replies
        return replies


def _round(
    n: int,
    lost: dict[str, set[int]],
    make_node=_Node,
    received: list | None = None,
    packed: list | None = None,
) -> tuple[np.ndarray, dict]:
    """One SecAgg+ round; `received` collects every reply the coordinator gets, `packed` every
    masked vector as it crossed the wire."""
    nodes = {i: make_node(i) for i in range(1, n + 1)}
    manager = SimpleClientManager()
    for i in nodes:
        manager.register(_Proxy(str(i)))
        manager.clients[str(i)].node_id = i
    threshold = max(2, round(0.6 * n))
    ws = SimpleNamespace(base_fingerprint="a" * 64, layout="b" * 16)
    spec = round_config(ws, {}, noise_shares=threshold, secagg_range=RANGE)
    strategy = FedAvg(min_fit_clients=n, min_available_clients=n, on_fit_config_fn=lambda _: spec)
    context = LegacyContext(
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        client_manager=manager,
    )
    size = nodes[1].update.size
    start = ndarrays_to_parameters([np.zeros(size, np.float32)])
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
        [a for a in parameters_to_ndarrays(start)]
    )
    workflow = SecureSumWorkflow(
        num_shares=1.0,
        reconstruction_threshold=0.6,  # above half: what a node needs to verify a session
        max_weight=1.0,
        clipping_range=RANGE,
        quantization_range=1 << 22,
        modulus_range=1 << 32,
    )
    grid = _Grid(nodes, lost)
    workflow(grid, context)
    if received is not None:
        received += grid.received
    if packed is not None:
        packed += grid.packed
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    return next(iter(record.values())).numpy(), nodes


@pytest.mark.parametrize("n", [3, 10])
@pytest.mark.parametrize("lost_count", [1, 2])
@pytest.mark.parametrize(
    "stage, in_sum",
    [
        (None, True),
        # Lost after sending its public keys, before sharing its key shares: no one masked with
        # it, so it is not in the round (Flower 1.42 alone fails the round: coordinator/round/secure_sum.py).
        (Stage.SHARE_KEYS, False),
        # Lost after sharing its key shares: the server rebuilds its pairwise masks from them.
        (Stage.COLLECT_MASKED_VECTORS, False),
        # Lost after sending its masked update: it is in the sum, signed or not.
        (wire.CONSISTENCY, True),
        (Stage.UNMASK, True),
    ],
)
def test_masks_cancel_in_a_secagg_round_whoever_is_lost_at_any_stage(
    n, lost_count, stage, in_sum, server_identity
):
    secagg_prg.install()
    lost = {stage: set(range(2, 2 + lost_count))} if stage else {}
    aggregate, nodes = _round(n, lost)
    gone = lost.get(stage, set())
    threshold = max(2, round(0.6 * n))
    if n - len(gone) < threshold:  # 3 nodes, 2 lost: below the threshold, nothing unmasked
        np.testing.assert_array_equal(aggregate, np.zeros(SIZE, np.float32))
        return
    included = [i for i in nodes if in_sum or i not in gone]
    expected = np.mean([nodes[i].update for i in included], axis=0)
    # Quantization to 22 bits over [-4, 4]: each value is within ~2e-6 of the plain average.
    np.testing.assert_allclose(aggregate, expected, atol=1e-5)
    for i in included:
        assert [s.threshold for s in nodes[i].secure_sums] == [threshold]
        assert nodes[i].secure_sums[0].clipping_range == RANGE
        assert nodes[i].secure_sums[0].verified  # pinned members, a threshold above half
    assert len({s.session for i in included for s in nodes[i].secure_sums}) == 1


def test_a_coordinator_with_another_mask_generator_cannot_unmask(server_identity, monkeypatch):
    # Why both sides must install the same generator, and proof that the test above would notice.
    from flwr.server.workflow.secure_aggregation import secaggplus_workflow

    def other(seed, num_range, dimensions_list):
        return secagg_prg.pseudo_rand_gen(seed[::-1], num_range, dimensions_list)

    secagg_prg.install()
    # The coordinator's process is this one here: keep the nodes from noticing its generator.
    monkeypatch.setattr(secagg_prg, "install", lambda: None)
    monkeypatch.setattr(secaggplus_workflow, "pseudo_rand_gen", other)
    aggregate, nodes = _round(3, {Stage.COLLECT_MASKED_VECTORS: {2}})
    expected = np.mean([nodes[i].update for i in (1, 3)], axis=0)
    assert np.abs(aggregate - expected).max() > 0.1


class _NoiseShareNode(_Node):
    """A node whose update is zero plus its Gaussian noise share, as an enterprise-level node
    adds it (privacy/plan.privatize_update) for the threshold its SecAgg+ setup says."""

    STD = 0.5  # the full noise: what any `threshold` shares must add up to

    def __init__(self, node_id: int):
        super().__init__(node_id)
        self.update = np.zeros(4096, np.float32)

    def fit(self, parameters, config, secure_sum):
        plan = EnterprisePlan("gaussian", clip=1.0, noise_multiplier=self.STD, rounds=1, delta=1e-5)
        self.update = privatize_update([self.update], plan, shares=secure_sum.threshold)[0][0]
        return super().fit(parameters, config, secure_sum)


@pytest.mark.parametrize("stage", [Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS])
def test_the_fewest_survivors_of_a_round_still_carry_the_full_noise(stage, server_identity):
    # 10 nodes, threshold 6; 4 lost mid-round: the sum that is unmasked is of exactly 6 shares.
    secagg_prg.install()
    aggregate, nodes = _round(10, {stage: {2, 4, 6, 8}}, make_node=_NoiseShareNode)
    noise_sum = aggregate.astype(np.float64) * 6  # the workflow hands out the average
    # 4096 samples: the standard deviation is known to ~1.1%.
    assert abs(noise_sum.std() / _NoiseShareNode.STD - 1) < 0.05
    expected = np.sum([nodes[i].update for i in (1, 3, 5, 7, 9, 10)], axis=0)
    np.testing.assert_allclose(noise_sum, expected, atol=5e-5)


def test_masked_vectors_travel_at_4_bytes_an_element_and_still_sum_right(server_identity):
    secagg_prg.install()
    packed = []
    aggregate, nodes = _round(3, {}, packed=packed)
    assert len(packed) == 3
    for weight, vector in packed:  # Flower's masked weight factor, then the masked update
        assert weight.dtype == vector.dtype == np.uint32 and vector.size == SIZE
    expected = np.mean([node.update for node in nodes.values()], axis=0)
    np.testing.assert_allclose(aggregate, expected, atol=1e-5)


def test_a_packed_masked_vector_crosses_the_wire_in_chunks_not_one_object():
    # Flower's ConfigRecord would carry it as one object, and protobuf caps an object at 2 GiB.
    vector = np.arange(3_000_000, dtype=np.int64) * 1000
    masked = [ndarray_to_bytes(np.array([7])), ndarray_to_bytes(vector)]
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: masked})})
    pack(content)
    sizes = [len(o.deflate()) for o in get_all_nested_objects(content).values()]
    assert max(sizes) < 5.3e6 and sum(sizes) > 4 * vector.size  # 12 MB in 5 MB chunks
    unpack(content)
    restored = content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    assert [bytes_to_ndarray(b).tolist() for b in restored] == [[7], vector.tolist()]
    assert MASKED not in content.array_records


def test_simulated_enterprises_pin_each_others_keys(tmp_path):
    # The simulation engine's nodes verify their SecAgg+ sessions like deployed ones: each has an
    # identity key beside its ledger, and all of them pin all of them.
    (tmp_path / "run.toml").write_text('[output]\ndir = "out"\n')
    config = load_run_config(tmp_path / "run.toml")
    run_config = FlowerRun(1, config, "sqlite://", "simulation").to_run_config()
    nodes = [NodeSettings.model_validate(n) for n in json.loads(run_config["sim-enterprises"])]
    federations = [n.federation() for n in nodes]
    fingerprints = {f.identity.fingerprint for f in federations}
    assert len(fingerprints) == len(nodes) == 3
    assert all(f.pinned == fingerprints for f in federations)
    again = FlowerRun(1, config, "sqlite://", "simulation").to_run_config()  # keys are kept
    assert again["sim-enterprises"] == run_config["sim-enterprises"]

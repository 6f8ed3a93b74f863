"""Expert-weighted aggregation: the weighting by hand, the layout, a node's release, the same
result through SecAgg+, the counts clipped and noised with the update under enterprise-level DP,
and the refusals (record-level DP, no routed-expert LoRA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import round_config, tiny_model
from test_node_terms import LORA, TRAIN, _adapter, _node
from test_secagg_round import IDENTITIES, PINNED, _round

from fedmoe.client.enterprise import RoundRefused
from fedmoe.client.secagg_guard import Federation
from fedmoe.contract.expert_weighting import (
    Weighting,
    expert_weighted_update,
    weighted_release,
    weighting_of_layout,
)
from fedmoe.contract.round import SecureSum
from fedmoe.coordinator.config import ConfigError, check_privacy, load_run_config
from fedmoe.model.lora import (
    adapter_parameters,
    attach_lora,
    expert_lora_modules,
    expert_slots,
    get_adapter_vector,
)
from fedmoe.privacy import plan as plan_module
from fedmoe.privacy import secagg_prg
from fedmoe.privacy.settings import EnterpriseLevel

# Two attention values, then 4 expert slots of 2 values each.
EXPERT_OF = np.array([-1, -1, 0, 0, 1, 1, 2, 2, 3, 3])


def test_each_expert_is_weighted_by_its_token_counts_as_by_hand():
    a = np.arange(1.0, 11.0)
    b = -np.arange(1.0, 11.0) * 2
    fa, fb = np.array([0.5, 0.0, 0.25, 0.0]), np.array([0.25, 0.0, 0.0, 0.0])
    plain = Weighting()
    average = (
        weighted_release(a, EXPERT_OF, fa, plain) + weighted_release(b, EXPERT_OF, fb, plain)
    ) / 2
    update = expert_weighted_update(average, EXPERT_OF, plain)
    expected = np.array(
        [
            (1 - 2) / 2,  # attention: the plain average
            (2 - 4) / 2,
            (0.5 * 3 + 0.25 * -6) / 0.75,  # expert 0: both, by their counts
            (0.5 * 4 + 0.25 * -8) / 0.75,
            0.0,  # expert 1: no one routed a token to it, so no update
            0.0,
            7.0,  # expert 2: only a
            8.0,
            0.0,
            0.0,
        ]
    )
    np.testing.assert_allclose(update, expected, atol=1e-12)
    # Under FedAvg, b's zero use of expert 2 would halve a's update there.
    assert (a[6] + b[6]) / 2 != update[6]


def test_a_release_is_refused_with_fractions_out_of_range_or_a_wrong_layout():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        weighted_release(np.zeros(10), EXPERT_OF, np.array([1.5, 0, 0, 0]), Weighting())
    with pytest.raises(ValueError, match="layout"):
        weighted_release(np.zeros(9), EXPERT_OF, np.zeros(4), Weighting())
    with pytest.raises(ValueError, match="does not fit"):
        expert_weighted_update(np.zeros(12), EXPERT_OF, Weighting())


def test_the_layout_maps_every_expert_factor_value_to_its_slot():
    model = attach_lora(tiny_model(), LORA)
    expert_of, layers = expert_slots(model)
    modules = expert_lora_modules(model)
    assert layers == sorted(modules)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.fill_(-1)
        for j, layer in enumerate(layers):
            for factor in modules[layer].factors():
                for e in range(factor.shape[0]):
                    factor[e] = j * factor.shape[0] + e
    np.testing.assert_array_equal(get_adapter_vector(model), expert_of)


def test_a_node_sends_weighted_experts_and_their_fractions_and_only_under_the_sum(tmp_path):
    node, ws = _node(tmp_path)
    expert_of, layers = expert_slots(ws.model)
    experts = ws.model.config.n_routed_experts
    for secure_sum in (None, SecureSum(threshold=1, clipping_range=8.0)):
        config = round_config(
            ws,
            {},
            lora=LORA,
            train=TRAIN,
            aggregation="expert-weighted",
            run_uid=f"{len(str(secure_sum)):032x}",
            noise_shares=1,
        )
        (release,), weight, metrics = node.fit(_adapter(ws), config, secure_sum)
        fractions = release[expert_of.size :]
        assert weight == 1 and release.size == expert_of.size + fractions.size
        assert fractions.size == len(layers) * experts
        assert ((fractions >= 0) & (fractions <= 1)).all()
        # Every token-slot of a full batch is counted once: each layer's fractions sum to 1.
        per_layer = fractions.reshape(len(layers), experts).sum(axis=1)
        np.testing.assert_allclose(per_layer, 1.0, atol=1e-6)
        assert ("expert_load" in metrics) == (secure_sum is None)


def test_a_node_refuses_expert_weighting_under_record_level_dp(tmp_path):
    node, ws = _node(tmp_path)
    config = round_config(
        ws,
        {"record": {"epsilon": 8.0}},
        lora=LORA,
        train=TRAIN,
        aggregation="expert-weighted",
    )
    with pytest.raises(RoundRefused, match="routing counts"):
        node.fit(_adapter(ws), config, secure_sum=None)
    assert node.ledger.entries() == []


class _WeightedNode:
    """A node whose update is a random expert-weighted release over `expert_of`."""

    def __init__(self, node_id: int, expert_of: np.ndarray = EXPERT_OF):
        rng = np.random.default_rng(100 + node_id)
        slots = int(expert_of.max()) + 1
        self.delta = rng.uniform(-1, 1, expert_of.size)
        self.fractions = rng.dirichlet(np.full(slots, 0.5)) * (rng.random(slots) > 0.3)
        self.update = weighted_release(self.delta, expert_of, self.fractions, Weighting())
        self.update = self.update.astype(np.float32)
        self.secure_sums = []
        self.federation = Federation(IDENTITIES[node_id], PINNED)

    def fit(self, parameters, config, secure_sum):
        self.secure_sums.append(secure_sum)
        return [self.update], 1, {}


@pytest.mark.parametrize("n", [3, 10])
def test_through_secagg_the_aggregate_is_the_plain_expert_weighted_one(n, server_identity):
    secagg_prg.install()
    aggregate, nodes = _round(n, {}, make_node=_WeightedNode)
    plain = np.mean([node.update.astype(np.float64) for node in nodes.values()], axis=0)
    update = expert_weighted_update(aggregate.astype(np.float64), EXPERT_OF, Weighting())
    expected = expert_weighted_update(plain, EXPERT_OF, Weighting())
    # 22-bit quantization over [-4, 4] (~2e-6 per value), divided by fractions of 0.05 or more.
    np.testing.assert_allclose(update, expected, atol=1e-3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"privacy.record.epsilon": 8.0}, "record-level DP-SGD does not cover"),
        ({"lora.targets": ["attention"]}, 'add "routed_experts" to lora.targets'),
    ],
)
def test_expert_weighting_is_refused_where_it_cannot_hold(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, {"federation.aggregation": "expert-weighted", **overrides})
    load_run_config(None, {"federation.aggregation": "expert-weighted"})
    load_run_config(
        None,
        {
            "federation.aggregation": "expert-weighted",
            "privacy.enterprise.epsilon": 8.0,
            "privacy.accept_noisy_plan": True,
        },
    )


def test_the_coordinator_cannot_read_any_single_update_or_count_vector(server_identity):
    """Everything the coordinator receives in a SecAgg+ round: public keys, encrypted key shares,
    masked vectors and the survivors' secret shares. No masked vector tells anything about the
    update under it, counts included; only the unmasked total is right."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    secagg_prg.install()
    # 8 attention values, then 128 experts x 8: enough values that chance correlations stay
    # far below the bounds (more than 4 standard deviations).
    expert_of = np.repeat(np.arange(-1, 128), 8)
    received: list = []
    aggregate, nodes = _round(
        10, {}, make_node=lambda i: _WeightedNode(i, expert_of), received=received
    )
    arrays = [
        bytes_to_ndarray(b).astype(np.float64)
        for reply in received
        for b in reply.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS, [])
    ]
    masked = [a for a in arrays if a.size > 1]  # each node also sends its masked weight
    assert len(masked) == len(nodes)
    for vector in masked:
        # Masked values are uniform on [0, 2^32): mean 2^31, spread 2^32 / sqrt(12).
        assert abs(vector.mean() / 2**31 - 1) < 0.1 and abs(vector.std() / 2**32 - 0.2887) < 0.03
        for node in nodes.values():
            update, counts = node.update[: expert_of.size], node.update[expert_of.size :]
            assert abs(np.corrcoef(vector[: expert_of.size], update)[0, 1]) < 0.15
            assert abs(np.corrcoef(vector[expert_of.size :], counts)[0, 1]) < 0.4
    plain = np.mean([node.update for node in nodes.values()], axis=0)
    np.testing.assert_allclose(aggregate, plain, atol=1e-5)


def test_the_private_scales_weigh_as_the_counts_do_and_leave_out_experts_under_half_a_share():
    # EXPERT_OF: 2 layers of 2 experts; the floor is half the uniform share, 1/4.
    private = Weighting.for_round(EnterpriseLevel(epsilon=8.0, clip=1e3), 2, experts=2, top_k=1)
    assert private.floor == 0.25 and private.expert_scale == 2.0
    deltas = np.random.default_rng(0).uniform(-1, 1, (3, EXPERT_OF.size))
    fractions = np.array([[0.6, 0.4, 0.9, 0.1], [0.5, 0.5, 1.0, 0.0], [0.3, 0.7, 0.8, 0.2]])

    def update(weighting):
        releases = [
            weighted_release(d, EXPERT_OF, f, weighting)
            for d, f in zip(deltas, fractions, strict=True)
        ]
        return expert_weighted_update(np.mean(releases, axis=0), EXPERT_OF, weighting)

    plain, scaled = update(Weighting()), update(private)
    # Experts 0-2 are used at a quarter of the slots or more: the same weighting by the counts.
    np.testing.assert_allclose(scaled[:8], plain[:8], atol=1e-12)
    # Expert 3 (a tenth of the slots): updated by its counts in a plain run, left out in a
    # private one, where a sum of fractions that small may be noise.
    assert np.all(plain[8:] != 0) and np.all(scaled[8:] == 0)


@pytest.mark.parametrize("mechanism, order", [("gaussian", 2), ("laplace", 1)])
def test_under_enterprise_dp_the_counts_are_clipped_and_noised_with_the_update(
    tmp_path, monkeypatch, mechanism, order
):
    """The whole release, counts included, is one clipped vector: its norm is within the clip (the
    sensitivity the accounting assumes), and the noise covers every element of it."""
    noise = {"value": 0.0}
    constant = lambda n, *args, **kwargs: np.full(n, noise["value"])  # noqa: E731
    monkeypatch.setattr(plan_module, "gaussian_noise", constant)
    monkeypatch.setattr(plan_module, "laplace_share_noise", constant)
    node, ws = _node(tmp_path)
    expert_of, layers = expert_slots(ws.model)
    clip = 0.05
    privacy = {"enterprise": {"epsilon": 8.0, "clip": clip, "mechanism": mechanism}}
    weighting = Weighting.for_round(
        EnterpriseLevel(**privacy["enterprise"]),
        len(layers),
        (int(expert_of.max()) + 1) // len(layers),
        ws.model.config.num_experts_per_tok,
    )
    for value, run in ((0.0, 1), (0.25, 2)):
        noise["value"] = value
        config = round_config(
            ws,
            privacy,
            lora=LORA,
            train=TRAIN,
            aggregation="expert-weighted",
            run_uid=f"{run:032x}",
        )
        (release,), weight, metrics = node.fit(_adapter(ws), config, secure_sum=None)
        assert weight == 1 and "expert_load" not in metrics
        # Less the noise (on every element, count or not), the release is within the clip.
        clean = release.astype(np.float64) - value
        rounding = clean.size * float(np.spacing(np.float32(value)))  # float32 release
        assert np.linalg.norm(clean, ord=order) <= clip * (1 + 1e-5) + rounding
        per_layer = clean[expert_of.size :].reshape(len(layers), -1).sum(axis=1)
        assert per_layer.min() > 0
        # The counts are released whole: every layer's fractions sum to 1 (full batches).
        np.testing.assert_allclose(per_layer / weighting.count_scale, 1.0, atol=1e-5)


@pytest.mark.parametrize("mechanism, order", [("gaussian", 2), ("laplace", 1)])
def test_a_private_release_stays_within_the_clip_whatever_its_update_and_counts(mechanism, order):
    enterprise = EnterpriseLevel(epsilon=8.0, clip=0.5, mechanism=mechanism)
    weighting = Weighting.for_round(enterprise, layers=2, experts=2, top_k=1)
    rng = np.random.default_rng(1)
    for scale in (1e-3, 1.0, 1e6):
        for fractions in (np.ones(4), np.zeros(4), rng.uniform(0, 1, 4)):
            release = weighted_release(scale * rng.normal(size=10), EXPERT_OF, fractions, weighting)
            assert np.linalg.norm(release, ord=order) <= 0.5 * (1 + 1e-9)


@pytest.mark.parametrize("mechanism, share", [("gaussian", 2**-0.5), ("laplace", 0.5)])
def test_the_plan_forecasts_the_update_with_only_its_share_of_the_clip(mechanism, share):
    private = {
        "privacy.enterprise.epsilon": 8.0,
        "privacy.enterprise.mechanism": mechanism,
        "privacy.accept_noisy_plan": True,
    }
    (plain,) = check_privacy(load_run_config(None, private))
    weighted = {**private, "federation.aggregation": "expert-weighted"}
    (forecast,) = check_privacy(load_run_config(None, weighted))
    assert forecast.noise_to_signal == pytest.approx(plain.noise_to_signal / share)


def test_a_layout_without_routed_expert_lora_weighs_nothing_at_any_privacy_level():
    # An enterprise-level run of attention or shared-expert LoRA: the coordinator builds this too.
    enterprise = EnterpriseLevel(epsilon=8.0)
    assert weighting_of_layout(enterprise, np.full(10, -1), [], top_k=2) == Weighting()
    private = weighting_of_layout(enterprise, EXPERT_OF, [1, 2], top_k=1)
    assert private == Weighting.for_round(enterprise, 2, experts=2, top_k=1)

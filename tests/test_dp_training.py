"""Record-level DP-SGD in the client and the node's privacy guarantees around a round: Opacus with
our per-example gradients equals the reference, physical batches change nothing, the update is
norm-bounded for every enterprise, budgets refuse before training, DP never silently does nothing."""

import numpy as np
import pytest
import torch
from conftest import round_config, tiny_model

from fedmoe.client import dp_trainer
from fedmoe.client.dp_trainer import train_local_private
from fedmoe.client.enterprise import EnterpriseNode, RoundFailed, workspace
from fedmoe.client.ledger import BudgetExceeded
from fedmoe.client.settings import NodeSettings
from fedmoe.contract.round import LocalTrainSettings, SecureSum
from fedmoe.model.corpus import DEMO_DATA_DIR, DEMO_ENTERPRISES
from fedmoe.model.data import PADDING
from fedmoe.model.lora import (
    adapter_parameters,
    attach_lora,
    get_adapter_tensors,
    get_adapter_vector,
)
from fedmoe.model.settings import LoraSettings
from fedmoe.privacy import plan as plan_module
from fedmoe.privacy.dp_sgd import SecureNoiseDPOptimizer, private_gradient
from fedmoe.privacy.mechanisms import l2_norm, seeded_uniform
from fedmoe.privacy.per_example import per_example_gradients
from fedmoe.privacy.plan import RecordPlan
from fedmoe.privacy.settings import NodeBudget

LORA = LoraSettings(r=4, alpha=8)
TRAIN = LocalTrainSettings(local_steps=2, batch_size=4, seq_len=32)


def _adapted():
    return attach_lora(tiny_model(), LoraSettings(r=2, alpha=4, init_seed=1))


def _records(n=6, seq_len=12, seed=0):
    ids = torch.randint(0, 64, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    ids[1, 7:] = PADDING  # a short record
    return ids


def _clip_and_noise_with_opacus(
    model, batches, clip, expected_batch_size, noise_multiplier=0.0, uniform=None
):
    params = adapter_parameters(model)
    opt = SecureNoiseDPOptimizer(
        torch.optim.SGD(params.values(), lr=1.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip,
        expected_batch_size=expected_batch_size,
        **({"uniform": uniform} if uniform else {}),
    )
    for i, batch in enumerate(batches):
        grads = per_example_gradients(model, batch)
        for name, p in params.items():
            p.grad_sample = grads[name]
        opt.signal_skip_step(do_skip=i < len(batches) - 1)  # what BatchMemoryManager does
        opt.pre_step()
    return {name: p.grad.clone() for name, p in params.items()}


def test_opacus_with_our_per_example_gradients_equals_the_reference_and_physical_batches_change_nothing():
    model, records = _adapted(), _records()
    reference = private_gradient(
        per_example_gradients(model, records),
        clip=0.05,
        noise_multiplier=0.0,
        expected_batch_size=4.0,
    )
    whole = _clip_and_noise_with_opacus(model, [records], clip=0.05, expected_batch_size=4)
    split = _clip_and_noise_with_opacus(
        model, [records[:2], records[2:5], records[5:]], clip=0.05, expected_batch_size=4
    )
    for name in reference:
        torch.testing.assert_close(whole[name], reference[name].float(), atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(split[name], reference[name].float(), atol=1e-7, rtol=1e-5)


def test_padding_is_ignored_per_example():
    model, records = _adapted(), _records()
    trimmed = records[1:2, :7]
    full = per_example_gradients(model, records[1:2])
    alone = per_example_gradients(model, trimmed)
    for name in full:
        torch.testing.assert_close(full[name], alone[name], atol=1e-6, rtol=1e-5)


def test_dp_sgd_noise_has_std_noise_multiplier_times_clip_over_expected_batch():
    model, records = _adapted(), _records()
    grads = _clip_and_noise_with_opacus(
        model,
        [records],
        clip=0.5,
        expected_batch_size=10,
        noise_multiplier=2.0,
        uniform=seeded_uniform(0),
    )
    reference = private_gradient(per_example_gradients(model, records), 0.5, 0.0, 10.0)
    noise = torch.cat([(grads[n].double() - reference[n]).flatten() for n in grads])
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 10, rel=0.05)


def test_private_training_takes_the_planned_steps_and_moves_the_adapter():
    model = _adapted()
    before = [t.clone() for t in get_adapter_tensors(model)]
    plan = RecordPlan(
        noise_multiplier=1.0,
        sample_rate=0.5,
        expected_batch_size=3.0,
        steps_per_round=3,
        rounds=1,
        delta=1e-5,
        accountant="rdp",
    )
    result = train_local_private(
        model,
        _records(),
        TRAIN,
        plan,
        clip=1.0,
        max_physical_batch_size=2,
        device=torch.device("cpu"),
    )
    assert result.steps == 3 and result.mean_loss is None
    assert any(
        not torch.equal(a, b) for a, b in zip(before, get_adapter_tensors(model), strict=True)
    )


def test_empty_poisson_batches_still_step_with_noise_only():
    model = _adapted()
    plan = RecordPlan(
        noise_multiplier=1.0,
        sample_rate=1e-4,
        expected_batch_size=1.0,
        steps_per_round=2,
        rounds=1,
        delta=1e-5,
        accountant="rdp",
    )
    result = train_local_private(
        model,
        _records(),
        TRAIN,
        plan,
        clip=1.0,
        max_physical_batch_size=2,
        device=torch.device("cpu"),
    )
    assert result.steps == 2 and result.sequences_seen == 0


# --- the client around a private round --------------------------------------------------------


def _client(tmp_path, enterprise="finance", **budget):
    node = NodeSettings(
        enterprise=enterprise,
        data=DEMO_DATA_DIR / enterprise,
        ledger=tmp_path / f"{enterprise}.sqlite",
        budget=NodeBudget(**budget),
    )
    ws = workspace(node, LORA, TRAIN.seq_len)
    return EnterpriseNode(node), ws


def _config(ws, privacy: dict, server_round=1, **changes):
    return round_config(ws, privacy, server_round, lora=LORA, train=TRAIN, **changes)


BOTH = {"record": {"epsilon": 8.0}, "enterprise": {"epsilon": 8.0, "clip": 0.05}}


@pytest.mark.parametrize("enterprise", DEMO_ENTERPRISES)
def test_every_clients_update_is_within_the_clipping_bound(tmp_path, monkeypatch, enterprise):
    monkeypatch.setattr(
        plan_module, "gaussian_noise", lambda n, std, uniform=None: np.zeros(n)
    )  # look at the clipped part alone
    client, ws = _client(tmp_path, enterprise)
    delta, weight, metrics = client.fit(
        [get_adapter_vector(ws.model)], _config(ws, BOTH), secure_sum=None
    )
    assert 0 < l2_norm(delta) <= 0.05 * (1 + 1e-6)
    # Nothing but the privatized delta and its accounting leaves: no loss, norm, expert load,
    # record or step count, no timing.
    assert weight == 1 and set(metrics) == {"enterprise", "epsilon_record", "epsilon_enterprise"}


def test_a_round_over_budget_is_refused_before_any_training(tmp_path):
    client, ws = _client(tmp_path, record_epsilon=0.5)
    adapter = get_adapter_vector(ws.model).copy()
    config = _config(ws, BOTH)
    answer = client.budget(config)
    assert answer["accept"] is False and "lifetime budget of 0.5" in answer["reason"]
    with pytest.raises(BudgetExceeded):
        client.fit([adapter], config, secure_sum=None)
    np.testing.assert_array_equal(adapter, get_adapter_vector(ws.model))
    assert client.ledger.entries() == []


def test_dp_that_leaves_the_adapter_unchanged_is_an_error(tmp_path, monkeypatch):
    # The silent Opacus failure: the optimizer steps tensors the model does not use.
    monkeypatch.setattr(
        dp_trainer,
        "adapter_parameters",
        lambda m: {
            n: torch.nn.Parameter(p.detach().clone()) for n, p in adapter_parameters(m).items()
        },
    )
    client, ws = _client(tmp_path)
    with pytest.raises(RuntimeError, match="left the adapter unchanged"):
        client.fit(
            [get_adapter_vector(ws.model)],
            _config(ws, {"record": {"epsilon": 8.0}}),
            secure_sum=None,
        )


def test_no_held_out_metrics_are_released_in_a_private_run(tmp_path):
    client, ws = _client(tmp_path)
    with pytest.raises(PermissionError, match="no held-out metrics"):
        client.evaluate([get_adapter_vector(ws.model)], _config(ws, BOTH))


def test_a_noise_share_is_never_sent_outside_secure_aggregation(tmp_path):
    client, ws = _client(tmp_path)
    config = _config(ws, BOTH, noise_shares=3)
    with pytest.raises(RuntimeError, match="not under secure aggregation"):
        client.fit([get_adapter_vector(ws.model)], config, secure_sum=None)
    assert client.ledger.entries() == []


def test_an_update_secure_aggregation_would_clip_is_refused_not_sent(tmp_path):
    client, ws = _client(tmp_path)
    config = _config(ws, {"record": {"epsilon": 8.0}}, noise_shares=2, secagg_range=1e-9)
    with pytest.raises(RoundFailed, match="exceeds the secure-aggregation range"):
        client.fit([get_adapter_vector(ws.model)], config, secure_sum=SecureSum(2, 1e-9))
    # Charged, and failed for good: asked again, the same failure, no second draw.
    entries = client.ledger.entries()
    with pytest.raises(RoundFailed, match="exceeds the secure-aggregation range"):
        client.fit([get_adapter_vector(ws.model)], config, secure_sum=SecureSum(2, 1e-9))
    assert client.ledger.entries() == entries

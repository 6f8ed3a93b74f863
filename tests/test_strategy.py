"""The coordinator's strategy without Flower's runtime: FedAvg of deltas, checks, round records."""

import datetime as dt
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedmoe.coordinator.config import load_run_config
from fedmoe.coordinator.db import RunStore
from fedmoe.coordinator.strategy import FederatedLoRA, RoundAborted, RoundContext, _PendingRound, sum_expert_load


def _fit(delta, n, **metrics):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), n, {"enterprise": metrics.pop("name", "e"), "train_loss": 1.0, **metrics})


@pytest.fixture
def setup(tmp_path):
    config = load_run_config(None, {"database.url": f"sqlite:///{tmp_path}/db.sqlite", "federation.min_fit_clients": 2})
    store = RunStore(config.database.url)
    run_id = store.create_run({}, planned_rounds=3)
    saved = []
    ctx = RoundContext(
        base_fingerprint="fp",
        adapter_layout="layout",
        initial_adapter=[np.zeros(2, dtype=np.float32), np.ones((1, 2), dtype=np.float32)],
        save_checkpoint=lambda r, a: saved.append((r, a)) or (f"/ckpt/{r}", "sha"),
    )
    strategy = FederatedLoRA(config, ctx, store, run_id)
    strategy.pending = _PendingRound(number=1, started_at=dt.datetime.now(dt.timezone.utc))
    return strategy, store, run_id, saved


def test_fedavg_of_deltas_is_weighted_by_examples(setup):
    strategy, store, run_id, saved = setup
    results = [
        (SimpleNamespace(node_id=1), _fit([np.array([1.0, 2.0], np.float32), np.array([[0.0, 4.0]], np.float32)], 100, name="a")),
        (SimpleNamespace(node_id=2), _fit([np.array([3.0, -2.0], np.float32), np.array([[4.0, 0.0]], np.float32)], 300, name="b")),
    ]
    params, _ = strategy.aggregate_fit(1, results, [])
    new = parameters_to_ndarrays(params)
    # global + (100*d1 + 300*d2) / 400
    np.testing.assert_allclose(new[0], [2.5, -1.0])
    np.testing.assert_allclose(new[1], [[1 + 3.0, 1 + 1.0]])
    assert saved[0][0] == 1
    eval_results = [(SimpleNamespace(node_id=i), EvaluateRes(Status(Code.OK, ""), loss, 10, {})) for i, loss in ((1, 2.0), (2, 4.0))]
    loss, _ = strategy.aggregate_evaluate(1, eval_results, [])
    assert loss == 3.0
    (r,) = store.rounds(run_id)
    assert (r.participants, r.eval_loss, r.checkpoint_path) == (2, 3.0, "/ckpt/1")
    assert {p.enterprise: p.eval_loss for p in r.participations} == {"a": 2.0, "b": 4.0}


def test_malformed_update_is_rejected_and_recorded(setup):
    strategy, store, run_id, _ = setup
    good = [np.array([1.0, 1.0], np.float32), np.zeros((1, 2), np.float32)]
    results = [
        (SimpleNamespace(node_id=1), _fit(good, 10, name="a")),
        (SimpleNamespace(node_id=2), _fit(good, 10, name="b")),
        (SimpleNamespace(node_id=3), _fit([np.array([np.nan, 0], np.float32), np.zeros((1, 2), np.float32)], 10, name="evil")),
    ]
    params, _ = strategy.aggregate_fit(1, results, [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [1.0, 1.0])
    strategy.flush()
    (r,) = store.rounds(run_id)
    evil = next(p for p in r.participations if p.enterprise == "evil")
    assert evil.status == "rejected" and "NaN" in evil.error


def test_too_few_usable_updates_abort_the_run_and_record_the_round(setup):
    strategy, store, run_id, saved = setup
    results = [(SimpleNamespace(node_id=1), _fit([np.zeros(2, np.float32), np.zeros((1, 2), np.float32)], 10))]
    with pytest.raises(RoundAborted, match="min_fit_clients=2"):
        strategy.aggregate_fit(1, results, [RuntimeError("client crashed")])
    (r,) = store.rounds(run_id)
    assert r.status == "failed" and not saved


def test_round_config_carries_everything_a_client_checks(setup):
    strategy, *_ = setup
    cfg = strategy.round_config(1)
    assert cfg["base_fingerprint"] == "fp" and cfg["adapter_layout"] == "layout" and cfg["measure_baseline"] is True
    assert strategy.round_config(2)["measure_baseline"] is False


def test_expert_load_sums_per_layer():
    assert sum_expert_load([{"1": [1, 2]}, {"1": [3, 0], "2": [5]}]) == {"1": [4, 2], "2": [5]}

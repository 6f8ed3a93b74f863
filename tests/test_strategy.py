"""The coordinator's strategy without Flower's runtime: FedAvg of deltas, checks, round records."""

import datetime as dt
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import RUN_UID
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from fedmoe.contract.round import BudgetAnswer
from fedmoe.coordinator.config import ConfigError, load_run_config
from fedmoe.coordinator.round.strategy import (
    BudgetExhausted,
    FederatedLoRA,
    RoundAborted,
    RoundContext,
    _PendingRound,
    sum_expert_load,
)
from fedmoe.coordinator.store.db import RunStore
from fedmoe.privacy.audit import epsilon_lower_bound

FP, LAYOUT = "f" * 64, "a" * 16
PRIVATE = {
    "privacy.record.epsilon": 8.0,
    "privacy.enterprise.epsilon": 8.0,
    "privacy.accept_noisy_plan": True,  # the tiny demo is far too small to learn privately
}  # runs with a budget handshake


def _fit(delta, n, **metrics):
    return FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters(delta),
        n,
        {"enterprise": metrics.pop("name", "e"), "train_loss": 1.0, **metrics},
    )


def _accept(name, eps_record=float("inf"), eps_enterprise=float("inf")):
    return {
        "enterprise": name,
        "accept": True,
        "reason": "",
        "epsilon_record": eps_record,
        "epsilon_enterprise": eps_enterprise,
    }


def _make(tmp_path, answers, **overrides):
    config = load_run_config(
        None,
        {
            "database.url": f"sqlite:///{tmp_path}/db.sqlite",
            "federation.min_fit_clients": 2,
            "privacy.accept_noisy_plan": True,  # the tiny demo is far too small to learn privately
            **overrides,
        },
    )
    store = RunStore(config.database.url)
    run_id = store.create_run({}, planned_rounds=3)
    saved, asked = [], []
    ctx = RoundContext(
        run_uid=RUN_UID,
        base_fingerprint=FP,
        adapter_layout=LAYOUT,
        initial_adapter=[np.zeros(2, dtype=np.float32), np.ones((1, 2), dtype=np.float32)],
        save_checkpoint=lambda r, a: saved.append((r, a)) or (f"/ckpt/{r}", "sha"),
        ask_nodes=lambda nodes, config: (
            asked.append((nodes, config)) or {n: answers[n] for n in nodes if n in answers}
        ),
        connect_timeout_s=0.5,
    )
    return FederatedLoRA(config, ctx, store, run_id), store, run_id, saved, asked


def _manager(node_ids):
    proxies = [SimpleNamespace(node_id=n, cid=str(n)) for n in node_ids]
    return SimpleNamespace(
        num_available=lambda: len(proxies),
        sample=lambda num_clients, min_num_clients, criterion=None: proxies[:num_clients],
        all=lambda: {str(p.node_id): p for p in proxies},
    )


@pytest.fixture
def setup(tmp_path):
    strategy, store, run_id, saved, _ = _make(tmp_path, {})
    strategy.pending = _PendingRound(number=1, started_at=dt.datetime.now(dt.UTC))
    return strategy, store, run_id, saved


def test_fedavg_of_deltas_is_weighted_by_examples(setup):
    strategy, store, run_id, saved = setup
    results = [
        (
            SimpleNamespace(node_id=1),
            _fit(
                [np.array([1.0, 2.0], np.float32), np.array([[0.0, 4.0]], np.float32)],
                100,
                name="a",
            ),
        ),
        (
            SimpleNamespace(node_id=2),
            _fit(
                [np.array([3.0, -2.0], np.float32), np.array([[4.0, 0.0]], np.float32)],
                300,
                name="b",
            ),
        ),
    ]
    params, _ = strategy.aggregate_fit(1, results, [])
    new = parameters_to_ndarrays(params)
    # global + (100*d1 + 300*d2) / 400
    np.testing.assert_allclose(new[0], [2.5, -1.0])
    np.testing.assert_allclose(new[1], [[1 + 3.0, 1 + 1.0]])
    assert saved[0][0] == 1
    eval_results = [
        (SimpleNamespace(node_id=i), EvaluateRes(Status(Code.OK, ""), loss, 10, {}))
        for i, loss in ((1, 2.0), (2, 4.0))
    ]
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
        (
            SimpleNamespace(node_id=3),
            _fit(
                [np.array([np.nan, 0], np.float32), np.zeros((1, 2), np.float32)], 10, name="evil"
            ),
        ),
    ]
    params, _ = strategy.aggregate_fit(1, results, [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [1.0, 1.0])
    strategy.flush()
    (r,) = store.rounds(run_id)
    evil = next(p for p in r.participations if p.enterprise == "evil")
    assert evil.status == "rejected" and "NaN" in evil.error


def test_too_few_usable_updates_abort_the_run_and_record_the_round(setup):
    strategy, store, run_id, saved = setup
    results = [
        (
            SimpleNamespace(node_id=1),
            _fit([np.zeros(2, np.float32), np.zeros((1, 2), np.float32)], 10),
        )
    ]
    with pytest.raises(RoundAborted, match="min_fit_clients=2"):
        strategy.aggregate_fit(1, results, [RuntimeError("client crashed")])
    (r,) = store.rounds(run_id)
    assert r.status == "failed" and not saved


def test_round_config_carries_everything_a_client_checks(setup):
    strategy, *_ = setup
    cfg = strategy.round_spec(1).to_config()
    assert (
        cfg["base_fingerprint"] == FP
        and cfg["adapter_layout"] == LAYOUT
        and cfg["measure_baseline"] is True
    )
    # A public run in the clear: every round's nodes score the adapter they receive.
    assert cfg["run_uid"] == RUN_UID and strategy.round_spec(2).to_config()["measure_baseline"]


def test_a_rounds_federated_evaluation_arrives_with_the_next_rounds_training(tmp_path):
    """Public runs in the clear: no evaluate message until the last round; round r's held-out
    losses are what round r+1's nodes report of the adapter they receive, written to round r."""
    strategy, store, run_id, _, _ = _make(tmp_path, {}, **{"federation.rounds": 2})
    manager = _manager([1, 2])
    update = [np.zeros(2, np.float32), np.zeros((1, 2), np.float32)]

    def train(number, **metrics):
        strategy.pending = _PendingRound(number=number, started_at=dt.datetime.now(dt.UTC))
        fits = [
            (SimpleNamespace(node_id=i), _fit(update, 10, name=n, **metrics.get(n, {})))
            for i, n in ((1, "a"), (2, "b"))
        ]
        params, _ = strategy.aggregate_fit(number, fits, [])
        strategy.evaluate(number, params)
        return params

    params = train(1, a={"heldout_loss_before": 9.0, "heldout_examples": 10})
    assert strategy.configure_evaluate(1, params, manager) == []
    (r1,) = store.rounds(run_id)  # committed without waiting for an evaluate message
    assert r1.eval_loss is None and r1.participations[0].heldout_loss_before == 9.0
    both = {
        "a": {"heldout_loss_before": 2.0, "heldout_examples": 10},
        "b": {"heldout_loss_before": 5.0, "heldout_examples": 30},
    }
    params = train(2, **both)
    (r1,) = store.rounds(run_id)  # the last round waits for its own evaluate message
    assert r1.eval_loss == pytest.approx((2.0 * 10 + 5.0 * 30) / 40)
    assert {p.enterprise: p.eval_loss for p in r1.participations} == {"a": 2.0, "b": 5.0}
    assert len(strategy.configure_evaluate(2, params, manager)) == 2
    evaluated = [(SimpleNamespace(node_id=1), EvaluateRes(Status(Code.OK, ""), 1.5, 10, {}))]
    strategy.aggregate_evaluate(2, evaluated, [])
    assert store.rounds(run_id)[1].eval_loss == 1.5
    # Written once: a replayed report does not overwrite it.
    assert not store.record_evaluation(run_id, 1, 0.0, {})


def test_evaluation_rides_on_training_only_in_the_clear(tmp_path):
    secure, *_ = _make(tmp_path, {}, **{"federation.secure_aggregation.enabled": True})
    private, *_ = _make(tmp_path / "p", {}, **PRIVATE)
    assert not secure.with_training and not secure.round_spec(2).measure_baseline
    assert not private.with_training and not private.round_spec(2).measure_baseline


def test_expert_load_sums_per_layer():
    assert sum_expert_load([{"1": [1, 2]}, {"1": [3, 0], "2": [5]}]) == {"1": [4, 2], "2": [5]}


def test_budget_handshake_records_refusals_and_epsilon_and_only_asks_acceptors_to_train(tmp_path):
    answers = {
        1: _accept("a", 0.5, 1.0),
        2: _accept("b", 0.5, 1.0),
        3: {
            "enterprise": "c",
            "accept": False,
            "reason": "record-level epsilon would reach 9 above this node's lifetime budget of 8",
        },
    }
    strategy, store, run_id, _, asked = _make(
        tmp_path, answers, **{"federation.min_fit_clients": 1, **PRIVATE}
    )
    params = ndarrays_to_parameters(strategy.global_adapter)
    instructions = strategy.configure_fit(1, params, _manager([1, 2, 3]))
    assert [p.node_id for p, _ in instructions] == [1, 2]
    assert asked[0][0] == [1, 2, 3] and asked[0][1]["query"] == "budget"
    good = [np.array([1.0, 1.0], np.float32), np.zeros((1, 2), np.float32)]
    strategy.aggregate_fit(
        1,
        [(SimpleNamespace(node_id=1), _fit(good, 1, name="a"))],
        [RuntimeError("b crashed after training")],
    )
    strategy.flush()
    (r,) = store.rounds(run_id)
    by_name = {p.enterprise: p for p in r.participations}
    assert (
        by_name["c"].status == "refused"
        and "lifetime budget" in by_name["c"].error
        and by_name["c"].epsilon_record is None
    )
    # b accepted and may have released its update before crashing: it is charged too.
    assert (by_name["a"].epsilon_record, by_name["b"].epsilon_record, by_name["b"].status) == (
        0.5,
        0.5,
        "failed",
    )
    assert by_name["a"].epsilon_enterprise == 1.0


def test_run_stops_cleanly_when_too_few_enterprises_have_budget(tmp_path):
    refuse = {"accept": False, "reason": "budget spent"}
    strategy, store, run_id, saved, _ = _make(
        tmp_path,
        {
            1: _accept("a", 1.0, 1.0),
            2: {**refuse, "enterprise": "b"},
            3: {**refuse, "enterprise": "c"},
        },
        **PRIVATE,
    )
    with pytest.raises(BudgetExhausted, match="1 of 3 sampled enterprises can take part, 2 needed"):
        strategy.configure_fit(
            1, ndarrays_to_parameters(strategy.global_adapter), _manager([1, 2, 3])
        )
    (r,) = store.rounds(run_id)
    assert (
        r.status == "failed"
        and {p.status for p in r.participations} == {"refused", "failed"}
        and not saved
    )


def test_handshake_failures_are_not_budget_stops(tmp_path):
    strategy, *_ = _make(tmp_path, {1: _accept("a", 1.0, 1.0)}, **PRIVATE)  # node 2 never answers
    with pytest.raises(RoundAborted, match="no answer"):
        strategy.configure_fit(1, ndarrays_to_parameters(strategy.global_adapter), _manager([1, 2]))


def test_a_round_without_an_aggregate_is_an_error_not_a_silent_skip(tmp_path):
    # SecAgg+ halts without calling aggregate_fit when too few clients finish.
    strategy, store, run_id, *_ = _make(
        tmp_path, {1: _accept("a", 1.0, 1.0), 2: _accept("b", 1.0, 1.0)}, **PRIVATE
    )
    strategy.configure_fit(1, ndarrays_to_parameters(strategy.global_adapter), _manager([1, 2]))
    with pytest.raises(RoundAborted, match="no aggregate"):
        strategy.evaluate(1, ndarrays_to_parameters(strategy.global_adapter))
    assert store.rounds(run_id)[0].status == "failed"


def test_failed_rounds_are_recorded_and_the_run_goes_on_as_far_as_max_failed_rounds(
    tmp_path, capsys
):
    strategy, store, run_id, saved, _ = _make(
        tmp_path,
        {1: _accept("a", 1.0, 1.0), 2: _accept("b", 1.0, 1.0)},
        **PRIVATE,
        **{"federation.max_failed_rounds": 2},
    )
    start = [a.copy() for a in strategy.global_adapter]
    parameters = ndarrays_to_parameters(start)
    # Round 1: node 3 never answers the handshake, too few can take part.
    assert strategy.configure_fit(1, parameters, _manager([1, 3])) == []
    assert strategy.evaluate(1, parameters) is None
    # Round 2: SecAgg+ halts (no aggregate).
    assert len(strategy.configure_fit(2, parameters, _manager([1, 2]))) == 2
    assert strategy.evaluate(2, parameters) is None
    # Round 3: one usable update of the two needed: a third failure stops the run.
    strategy.configure_fit(3, parameters, _manager([1, 2]))
    one = [(SimpleNamespace(node_id=1), _fit([np.ones(2, np.float32), np.ones((1, 2))], 1))]
    with pytest.raises(RoundAborted, match="min_fit_clients=2"):
        strategy.aggregate_fit(3, one, [])
    assert [r.status for r in store.rounds(run_id)] == ["failed"] * 3
    assert sorted(strategy.failed) == [1, 2] and not saved
    for kept, before in zip(strategy.global_adapter, start, strict=True):
        np.testing.assert_array_equal(kept, before)  # nothing half-applied
    out = capsys.readouterr().out
    assert "round 2 failed and is recorded; the run goes on" in out and "(2 of" in out


def test_max_failed_rounds_must_leave_a_round_to_train():
    with pytest.raises(ConfigError, match=r"federation.max_failed_rounds.*below rounds \(3\)"):
        load_run_config(None, {"federation.max_failed_rounds": 3})


def test_private_runs_ask_for_no_held_out_metrics_and_send_the_noise_shares(tmp_path):
    strategy, *_ = _make(
        tmp_path,
        {n: _accept(str(n), 1.0, 1.0) for n in (1, 2, 3)},
        **{
            "privacy.enterprise.epsilon": 4.0,
            "privacy.enterprise.delta": 1e-6,
            "federation.secure_aggregation.enabled": True,
        },
    )
    instructions = strategy.configure_fit(
        1, ndarrays_to_parameters(strategy.global_adapter), _manager([1, 2, 3])
    )
    config = instructions[0][1].config
    assert config["noise_shares"] == 2  # SecAgg+ unmasks sums of >= round(0.67 * 3) = 2 clients
    assert config["secagg_range"] > strategy.config.privacy.enterprise.clip
    assert (
        strategy.configure_evaluate(
            1, ndarrays_to_parameters(strategy.global_adapter), _manager([1, 2, 3])
        )
        == []
    )


def test_a_node_that_would_train_without_the_runs_privacy_is_not_asked_to_train(tmp_path):
    answers = {1: _accept("a", 1.0, 1.0), 2: _accept("b", 1.0, 1.0), 3: _accept("old-version")}
    strategy, store, run_id, *_ = _make(
        tmp_path, answers, **{"privacy.record.epsilon": 4.0, "privacy.enterprise.epsilon": 4.0}
    )
    instructions = strategy.configure_fit(
        1, ndarrays_to_parameters(strategy.global_adapter), _manager([1, 2, 3])
    )
    assert [p.node_id for p, _ in instructions] == [1, 2]
    assert "no record or enterprise-level privacy" in strategy.pending.participations["3"].error


def test_a_plain_run_asks_no_budget_handshake_and_records_who_refused_in_training(tmp_path):
    strategy, store, run_id, _, asked = _make(tmp_path, {}, **{"federation.min_fit_clients": 1})
    strategy.ctx.enterprise_of = {1: "a", 2: "b", 3: "c"}.get  # registered nodes: named
    errors = {
        3: "<class 'fedmoe.client.ledger.BudgetExceeded'>:<'the run gives no record-level privacy guarantee'>"
    }
    strategy.ctx.node_errors = lambda: errors
    instructions = strategy.configure_fit(
        1, ndarrays_to_parameters(strategy.global_adapter), _manager([1, 2, 3])
    )
    assert [p.node_id for p, _ in instructions] == [1, 2, 3] and asked == []
    good = [np.array([1.0, 1.0], np.float32), np.zeros((1, 2), np.float32)]
    results = [
        (SimpleNamespace(node_id=n), _fit(good, 5, name=name)) for n, name in ((1, "a"), (2, "b"))
    ]
    strategy.aggregate_fit(1, results, [Exception("refused")])
    strategy.flush()
    (r,) = store.rounds(run_id)
    refused = next(p for p in r.participations if p.node_id == "3")
    assert (
        refused.status == "refused"
        and refused.error == "BudgetExceeded: the run gives no record-level privacy guarantee"
    )


def test_the_audit_adds_up_the_nodes_counts_and_says_when_it_refutes_the_claim(tmp_path, capsys):
    strategy, store, run_id, *_ = _make(
        tmp_path,
        {},
        **{"privacy.record.epsilon": 1.0, "privacy.audit.canaries": 100, "federation.rounds": 1},
    )
    strategy.pending = _PendingRound(number=1, started_at=dt.datetime.now(dt.UTC))
    strategy.pending.trained = [SimpleNamespace(node_id=i) for i in (1, 2, 3)]
    (_, ins), *_ = strategy.configure_evaluate(1, ndarrays_to_parameters([]), _manager([1, 2, 3]))
    assert ins.config["audit"] is True  # the last round of an audited (private) run

    def answer(correct, guesses=40):
        counts = {"audit_canaries": 100, "audit_guesses": guesses, "audit_correct": correct}
        return EvaluateRes(Status(Code.OK, ""), float("nan"), 0, counts)

    results = [(SimpleNamespace(node_id=i), answer(40)) for i in (1, 2)]
    results.append((SimpleNamespace(node_id=3), answer(50, guesses=40)))  # malformed: ignored
    strategy.aggregate_evaluate(1, results, [])
    audit = store.run(run_id).audit
    assert (audit["canaries"], audit["guesses"], audit["correct"]) == (200, 80, 80)
    assert audit["epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(200, 80, 80, 1e-5))
    assert audit["epsilon_lower_bound"] > 1.0 == audit["claimed_epsilon"]
    assert "WARNING: the audit refutes the run's privacy claim" in capsys.readouterr().out


def test_a_round_records_the_bytes_the_grid_counted_from_its_start_to_its_commit(tmp_path):
    # Under SecAgg+ the strategy never sees the nodes' messages: the bytes are the grid's.
    strategy, store, run_id, *_ = _make(tmp_path, {}, **{"federation.min_fit_clients": 1})
    strategy.ctx.enterprise_of = {1: "a"}.get
    traffic = {"down": 1_000, "up": 200}  # an earlier round's messages
    strategy.ctx.traffic = lambda: (traffic["down"], traffic["up"])
    strategy.configure_fit(1, ndarrays_to_parameters(strategy.global_adapter), _manager([1]))
    traffic["down"], traffic["up"] = 1_700, 250  # the round's messages go out and come back
    good = [np.array([1.0, 1.0], np.float32), np.zeros((1, 2), np.float32)]
    strategy.aggregate_fit(1, [(SimpleNamespace(node_id=1), _fit(good, 5))], [])
    traffic["down"], traffic["up"] = 1_900, 260  # federated evaluation is part of the round
    strategy.aggregate_evaluate(
        1, [(SimpleNamespace(node_id=1), EvaluateRes(Status(Code.OK, ""), 1.0, 10, {}))], []
    )
    (r,) = store.rounds(run_id)
    assert (r.bytes_down, r.bytes_up) == (900, 60)


def test_a_plain_simulation_asks_unnamed_nodes_once_so_failures_carry_names(tmp_path):
    answers = {n: BudgetAnswer(accept=True, enterprise=f"e{n}").to_properties() for n in (1, 2)}
    strategy, store, run_id, _, asked = _make(
        tmp_path, answers, **{"federation.min_fit_clients": 1}
    )
    parameters = ndarrays_to_parameters(strategy.global_adapter)
    assert len(strategy.configure_fit(1, parameters, _manager([1, 2]))) == 2
    with pytest.raises(RoundAborted, match="e1: boom; e2: boom"):
        strategy.aggregate_fit(1, [], [Exception("boom"), Exception("boom")])
    assert [nodes for nodes, _ in asked] == [[1, 2]]
    (failed,) = store.rounds(run_id)
    assert {(p.enterprise, p.error) for p in failed.participations} == {
        ("e1", "boom"),
        ("e2", "boom"),
    }
    strategy.pending = None
    strategy.configure_fit(2, parameters, _manager([1, 2]))
    assert len(asked) == 1  # named now: no second handshake


def test_a_round_that_could_not_commit_fails_before_any_node_is_asked(tmp_path):
    answers = {n: _accept(str(n), 1.0, 1.0) for n in (1, 2)}
    strategy, store, run_id, saved, asked = _make(tmp_path, answers, **PRIVATE)
    strategy.ctx.storage_problem = lambda: "cannot write checkpoints to /x (Not a directory)"
    with pytest.raises(RoundAborted, match="cannot write checkpoints to /x"):
        strategy.configure_fit(1, ndarrays_to_parameters(strategy.global_adapter), _manager([1, 2]))
    assert asked == [] and not saved  # no handshake: no node charged anything
    (failed,) = store.rounds(run_id)
    assert failed.status == "failed" and failed.participations == []


@pytest.mark.parametrize(
    "reason",
    [
        # deployment: Flower's ClientApp names the type; simulation: our named_errors mod does
        "<class 'fedmoe.client.ledger.ReplayRefused'>:<'round 1 of run 0123abcd was charged and its draw is under way or was cut short; one draw per charge'>",
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\\nException ClientAppException occurred. Message: ReplayRefused: round 1 of run 0123abcd was already released from another global adapter; one release per round'>",
    ],
)
def test_a_round_every_node_refuses_as_a_replay_is_lost_and_the_run_goes_on(tmp_path, reason):
    """A resumed run asks again a round its nodes released (or were cut short in) before the
    coordinator stopped: the round is recorded failed and the run goes on, even with
    max_failed_rounds = 0 (the nodes keep one release per round; nothing is wrong with the run)."""
    strategy, store, run_id, _, _ = _make(tmp_path, {}, **{"federation.min_fit_clients": 1})
    assert strategy.config.federation.max_failed_rounds == 0
    strategy.ctx.enterprise_of = {1: "a", 2: "b"}.get
    strategy.ctx.node_errors = lambda: {1: reason, 2: reason}
    strategy.configure_fit(1, ndarrays_to_parameters(strategy.global_adapter), _manager([1, 2]))
    assert strategy.aggregate_fit(1, [], [Exception("x"), Exception("y")]) == (None, {})
    (r,) = store.rounds(run_id)
    assert r.status == "failed" and {p.status for p in r.participations} == {"refused"}
    assert strategy.failed.keys() == {1} and strategy.replayed == {1}
    # A replay refusal among other failures is a plain failure: max_failed_rounds = 0 stops.
    strategy.ctx.node_errors = lambda: {1: reason, 2: "RuntimeError: out of memory"}
    strategy.configure_fit(2, ndarrays_to_parameters(strategy.global_adapter), _manager([1, 2]))
    with pytest.raises(BudgetExhausted):
        strategy.aggregate_fit(2, [], [Exception("x")])

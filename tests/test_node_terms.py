"""A node's privacy terms against a coordinator that asks for less privacy than it says.

Each test drives `EnterpriseNode` directly with the messages a curious or inconsistent coordinator
could send (a larger delta, more noise shares than the SecAgg+ setup allows, another SecAgg+
range, an evaluate that claims the run is not private) and checks the refusal and that the node's
ledger did not move. The epsilon and refusal texts a node sends must not depend on its data size."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import round_config

from fedmoe.client.enterprise import EnterpriseNode, RoundRefused, workspace
from fedmoe.client.settings import NodeSettings
from fedmoe.contract.round import LocalTrainSettings, RoundSpec, SecureSum
from fedmoe.model.corpus import DEMO_DATA_DIR
from fedmoe.model.lora import get_adapter_vector
from fedmoe.model.settings import LoraSettings
from fedmoe.privacy import plan as plan_module
from fedmoe.privacy.plan import plan_run
from fedmoe.privacy.settings import NodeBudget, PrivacySettings

LORA = LoraSettings(r=4, alpha=8)
TRAIN = LocalTrainSettings(local_steps=2, batch_size=4, seq_len=32)
BOTH = {"record": {"epsilon": 8.0}, "enterprise": {"epsilon": 8.0, "clip": 0.05}}


def _node(tmp_path, data=DEMO_DATA_DIR / "finance", name="finance", **budget):
    settings = NodeSettings(
        enterprise=name,
        data=data,
        ledger=tmp_path / f"{name}.sqlite",
        budget=NodeBudget(**budget),
    )
    return EnterpriseNode(settings), workspace(settings, LORA, TRAIN.seq_len)


def _config(ws, privacy=BOTH, server_round=1, **changes):
    return round_config(ws, privacy, server_round, lora=LORA, train=TRAIN, **changes)


def _adapter(ws):
    return [get_adapter_vector(ws.model).copy()]


def test_a_run_delta_above_the_nodes_delta_is_refused_and_nothing_is_charged(tmp_path):
    node, ws = _node(tmp_path, delta=1e-6)
    for level in ("record", "enterprise"):
        privacy = {level: {**BOTH[level], "delta": 1e-5}}
        answer = node.budget(_config(ws, privacy))
        assert answer["accept"] is False and f"{level}-level delta 1e-05" in answer["reason"]
        with pytest.raises(RoundRefused, match="above this node's delta 1e-06"):
            node.fit(_adapter(ws), _config(ws, privacy), secure_sum=None)
    assert node.ledger.entries() == []


def test_the_ledger_charges_epsilon_at_the_nodes_own_delta(tmp_path):
    node, ws = _node(tmp_path, delta=1e-3)
    _, _, metrics = node.fit(_adapter(ws), _config(ws), secure_sum=None)
    plan = plan_run(PrivacySettings.model_validate(BOTH), 400, TRAIN.local_steps, 3)
    for level in ("record", "enterprise"):
        at_node = plan.epsilon_after(level, 1, 1e-3)
        assert metrics[f"epsilon_{level}"] == pytest.approx(at_node[0])
        assert at_node[0] < plan.epsilon_after(level, 1)[0]  # the run's own delta is 1e-5
    assert {delta for *_, delta, _ in node.ledger.entries()} == {1e-3}
    assert node.ledger.lifetime_delta("record") == pytest.approx(1e-3)


@pytest.mark.parametrize("shares", [10_000, 1, 3])
def test_noise_shares_the_secagg_setup_does_not_back_are_refused(tmp_path, shares):
    node, ws = _node(tmp_path)
    config = _config(ws, noise_shares=shares)
    with pytest.raises(RoundRefused, match="SecAgg\\+ setup unmasks sums of 2 or more"):
        node.fit(_adapter(ws), config, secure_sum=SecureSum(threshold=2, clipping_range=10.0))
    assert node.ledger.entries() == []


def test_the_noise_share_comes_from_the_secagg_setup(tmp_path, monkeypatch):
    stds = []
    original = plan_module.gaussian_noise
    monkeypatch.setattr(
        plan_module,
        "gaussian_noise",
        lambda n, std, uniform=None: stds.append(std) or original(n, std),
    )
    verified = SecureSum(4, 10.0, session="a" * 64, verified=True)
    node, ws = _node(tmp_path)
    node.fit(_adapter(ws), _config(ws, noise_shares=4), secure_sum=verified)
    full = plan_run(PrivacySettings.model_validate(BOTH), 400, 2, 3).enterprise.noise_scale
    assert stds == [pytest.approx(full / 2)]  # sigma / sqrt(4)
    # A session the node could not verify (peers not pinned): the full noise, whatever the setup.
    unsure, ws = _node(tmp_path, name="unsure")
    unverified = SecureSum(4, 10.0, session="b" * 64, verified=False)
    unsure.fit(_adapter(ws), _config(ws, noise_shares=4), secure_sum=unverified)
    assert stds[-1] == pytest.approx(full)
    # A node that trusts no threshold adds the full noise even in a verified session.
    careful, ws = _node(tmp_path, name="careful", full_noise=True)
    careful.fit(_adapter(ws), _config(ws, noise_shares=4), secure_sum=verified)
    assert stds[-1] == pytest.approx(full)


def test_a_secagg_range_other_than_the_setups_is_refused(tmp_path):
    node, ws = _node(tmp_path)
    config = _config(ws, noise_shares=2, secagg_range=50.0)
    with pytest.raises(RoundRefused, match="not the SecAgg\\+ setup's clipping range 10"):
        node.fit(_adapter(ws), config, secure_sum=SecureSum(2, 10.0))
    assert node.ledger.entries() == []


def test_a_node_that_trained_privately_refuses_evaluate_whatever_the_message_says(tmp_path):
    node, ws = _node(tmp_path)  # no lifetime budget: only the ledger remembers
    node.fit(_adapter(ws), _config(ws), secure_sum=None)
    with pytest.raises(PermissionError, match="no held-out metrics"):
        node.evaluate(_adapter(ws), _config(ws, privacy={}, server_round=2))
    other_run = _config(ws, privacy={}, run_uid="f" * 32)
    assert math.isfinite(node.evaluate(_adapter(ws), other_run)[0])  # another run is another matter


def test_what_a_node_sends_does_not_depend_on_how_many_records_it_holds(tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    lines = (DEMO_DATA_DIR / "finance" / "train.jsonl").read_text().splitlines()
    (half / "train.jsonl").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    (half / "heldout.jsonl").write_text((DEMO_DATA_DIR / "finance" / "heldout.jsonl").read_text())
    full, ws_full = _node(tmp_path / "a")
    small, ws_small = _node(tmp_path / "b", data=half)
    assert ws_full.train_records.shape[0] != ws_small.train_records.shape[0]
    answers = [n.budget(_config(w)) for n, w in ((full, ws_full), (small, ws_small))]
    assert answers[0] == answers[1]
    metrics = [
        n.fit(_adapter(w), _config(w), secure_sum=None)[2]
        for n, w in ((full, ws_full), (small, ws_small))
    ]
    assert metrics[0] == metrics[1]
    # An infeasible plan's refusal names no count either.
    tight = {"record": {"epsilon": 0.01, "max_noise_multiplier": 1.0}}
    reasons = {
        n.budget(_config(w, tight, run_uid="e" * 32))["reason"]
        for n, w in ((full, ws_full), (small, ws_small))
    }
    assert len(reasons) == 1


AUDITED = {**BOTH, "audit": {"canaries": 40, "guess_fraction": 0.5}}


def test_an_audited_node_trains_on_its_secret_canaries_and_releases_only_counts(tmp_path):
    node, ws = _node(tmp_path)
    rows = node._training_rows(RoundSpec.from_config(_config(ws, AUDITED)), ws)
    canaries, included = node._canaries(RoundSpec.from_config(_config(ws, AUDITED)), ws)
    assert rows.shape[0] == ws.train_records.shape[0] + included.sum()
    assert 0 < included.sum() < 40
    _, _, metrics = node.fit(_adapter(ws), _config(ws, AUDITED), secure_sum=None)
    assert set(metrics) == {"enterprise", "epsilon_record", "epsilon_enterprise"}
    # Evaluate in a private run: no held-out loss, only the audit's counts.
    with pytest.raises(PermissionError):
        node.evaluate(_adapter(ws), _config(ws, AUDITED, server_round=3))
    loss, n, counts = node.evaluate(_adapter(ws), _config(ws, AUDITED, server_round=3, audit=True))
    assert math.isnan(loss) and n == 0
    assert set(counts) == {"enterprise", "audit_canaries", "audit_guesses", "audit_correct"}
    assert counts["audit_canaries"] == 40 and counts["audit_guesses"] == 20
    assert 0 <= counts["audit_correct"] <= 20
    # The same canaries every round of the run; another run gets others.
    again, _ = node._canaries(RoundSpec.from_config(_config(ws, AUDITED, server_round=2)), ws)
    other, _ = node._canaries(RoundSpec.from_config(_config(ws, AUDITED, run_uid="d" * 32)), ws)
    assert torch.equal(canaries, again) and not torch.equal(canaries, other)


def test_an_audit_request_in_a_run_without_an_audit_is_refused(tmp_path):
    node, ws = _node(tmp_path)
    with pytest.raises(RoundRefused, match="without \\[privacy.audit\\]"):
        node.evaluate(_adapter(ws), _config(ws, {}, audit=True))


def test_a_node_below_the_runs_public_record_bound_refuses_with_one_fixed_text(tmp_path):
    """The coordinator forecast a deployed run on `privacy.record.min_records`: a node holding
    fewer records refuses, saying only that it is below that public bound (the demo's 400)."""
    node, ws = _node(tmp_path)
    above = {**BOTH, "record": {**BOTH["record"], "min_records": 401}}
    answers = {node.budget(_config(ws, above))["reason"] for _ in range(2)}
    assert answers == {
        "this node holds fewer training records than the run's public bound "
        "privacy.record.min_records = 401"
    }
    with pytest.raises(RoundRefused, match="min_records = 401"):
        node.fit(_adapter(ws), _config(ws, above), secure_sum=None)
    at = {**BOTH, "record": {**BOTH["record"], "min_records": 400}}
    assert node.budget(_config(ws, at))["accept"] is True
    assert node.ledger.entries() == []
    # The bound is public and sets no noise: the same run under another bound is one run.
    keys = {RoundSpec.from_config(_config(ws, p)).ledger_key() for p in (above, at, BOTH)}
    assert len(keys) == 1


def test_the_nodes_ledger_names_a_run_by_the_coordinators_number_as_first_given(tmp_path):
    from fedmoe.cli.agent import ledger_rows

    node, ws = _node(tmp_path)
    node.fit(_adapter(ws), _config(ws, run_number=7), secure_sum=None)
    node.fit(_adapter(ws), _config(ws, server_round=2, run_number=9), secure_sum=None)
    rows = ledger_rows(node.ledger)["entries"]
    assert {e["run_id"] for e in rows} == {7}  # a later relabel is ignored: a label, not a key
    assert all(e["run_key"].startswith(RoundSpec.from_config(_config(ws)).run_uid) for e in rows)

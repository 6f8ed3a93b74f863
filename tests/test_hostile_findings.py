"""One test per way an independent review got more out of a node than its ledger charged, each
played as that coordinator played it (tests/hostile.py) against the real node and ClientApp.
The state machine in test_hostile_coordinator.py explores the sequences around them."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import round_config
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from hostile import (
    LORA,
    PLANS,
    PRIVATE_METRICS,
    TRAIN,
    Party,
    SecAggSession,
    make_federation,
    make_peer,
    make_victim,
    masked_vector,
)

from fedmoe.client import enterprise
from fedmoe.client.enterprise import workspace
from fedmoe.client.trainer import LocalTrainResult
from fedmoe.model.lora import get_adapter_vector
from fedmoe.privacy import secagg_prg
from fedmoe.privacy.settings import NodeBudget

PRIVATE = PLANS["enterprise"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    return make_federation(tmp_path_factory.mktemp("federation"))


@pytest.fixture(autouse=True)
def _flower(server_identity):
    secagg_prg.install()


class World:
    """The victim (node 1), honest peers 2 and 3, and the coordinator's view of them."""

    def __init__(self, directory, federation, **victim):
        self.victim = make_victim(directory, federation, **victim)
        self.ws = workspace(self.victim.node, LORA, TRAIN.seq_len)
        self.adapter = get_adapter_vector(self.ws.model).copy()
        self.parties = {1: Party(1, self.victim)}
        self.parties |= {n: Party(n, make_peer(n, federation)) for n in (2, 3)}

    def config(self, server_round, privacy=PRIVATE, **changes):
        changes.setdefault("rounds", 100)
        return round_config(self.ws, privacy, server_round, lora=LORA, train=TRAIN, **changes)

    def fit_content(self, config):
        fit = FitIns(ndarrays_to_parameters([self.adapter]), config)
        return lambda nid: compat.fitins_to_recorddict(fit, True)

    def session(self, run, members=(1, 2, 3), threshold=2, fakes=0, kind="unpinned", **more):
        parties = {n: self.parties[n] for n in members}
        session = SecAggSession(run, parties, threshold, set(), **more)
        for i in range(fakes):
            session.add_fake(100 + i, kind)
        session.setup(list(members))
        session.share_keys({n: sorted(session.keys) for n in members})
        return session

    def collect(self, session, server_round, privacy=PRIVATE, **changes):
        changes.setdefault("noise_shares", session.threshold)
        changes.setdefault("secagg_range", session.clipping_range)
        config = self.config(server_round, privacy, **changes)
        session.collect(sorted(session.parties), self.fit_content(config))
        session.party_session = {
            n: (p.session(session.run) or b"").hex() for n, p in session.parties.items()
        }

    def errors(self, nid=1) -> list[str]:
        return [r.error.reason for r in self.parties[nid].replies if r.has_error()]


def test_re_asking_earlier_rounds_gets_no_fresh_release(tmp_path, federation):
    # Finding 1: rounds 1, 2, 1, 2, ... gave a newly trained, newly noised update every time.
    world = World(tmp_path, federation)
    victim = world.parties[1]
    for server_round in (1, 2, 1, 2, 1, 2):
        victim.fit(1, world.adapter, world.config(server_round))
    assert len(world.victim.attempts) == 2  # two draws, for two charges
    assert world.victim.ledger.participations(world.victim.ledger.entries()[0][0], "record") == 2
    assert sum("rounds only go forward" in e for e in world.errors()) == 2
    released = [d for d, _, _ in world.victim.outputs]
    assert released[1:] == [released[1]] * 3  # round 2 again: the same bytes, never new ones


def test_fake_peers_never_earn_a_noise_share_or_a_key_share(tmp_path, federation):
    # Finding 2: one honest node, t = 50 and 50 peer keys of the coordinator's own.
    world = World(tmp_path, federation)
    session = world.session(1, members=(1,), threshold=50, fakes=50)
    assert not session.inbox and not session.seed_holders  # nothing encrypted to a fake
    assert "smaller than threshold" in world.errors()[-1]
    world.collect(session, 1)
    assert session.masked_with == {} and world.victim.attempts == []


def test_without_a_pinned_federation_fake_peers_get_only_a_fully_noised_update(
    tmp_path, federation
):
    world = World(tmp_path, federation, federation_keys=None)
    session = world.session(1, members=(1,), threshold=5, fakes=5)
    for nid in [1]:
        session.forge_from_fakes(nid)
    world.collect(session, 1)
    assert (1,) in session.isolatable()  # the coordinator holds every share of it ...
    assert list(world.victim.shares.values()) == [1]  # ... and it carries the full noise


def test_a_node_listed_as_survivor_and_as_dropped_is_never_unmasked(tmp_path, federation):
    # Finding 3: honest peers answered with both its self-mask share and its key share.
    world = World(tmp_path, federation)
    session = world.session(1)
    world.collect(session, 1)
    session.consistency([1, 2, 3], [1, 2, 3])
    session.unmask([2, 3, 1], active=[1, 2, 3], dead=[1], forge=False)
    for nid in (1, 2, 3):
        assert "dropped is a survivor" in world.errors(nid)[-1]
    assert not any(session.seed_holders.values()) and not any(session.sk_holders.values())
    assert session.isolatable() == []
    # With the victim's signature alone and made-up ones for the others: nothing either.
    victims_only = {1: session.signatures[1]}
    signed, session.signatures = session.signatures, victims_only
    session.unmask([2, 3], active=[1, 2, 3], dead=[], forge=True)
    assert "1 members signed this survivor set, 2 needed" in world.errors(2)[-1]
    assert not any(session.seed_holders.values())
    # The set they signed, signed by enough of them: the sum of all three, never less.
    session.signatures = signed
    session.unmask([1, 2, 3], active=[1, 2, 3], dead=[], forge=False)
    assert session.isolatable() == [(1, 2, 3)]


def test_one_release_never_goes_into_two_sessions(tmp_path, federation):
    # Finding 4: two sessions of one round, {X, A, B} and {A, B}: their difference is X alone.
    world = World(tmp_path, federation)
    first = world.session(1)
    world.collect(first, 1)
    second = world.session(2, members=(1, 2))  # another Flower run of the same fedmoe run
    world.collect(second, 1)
    assert 1 in first.masked_with and 1 not in second.masked_with
    assert "another secure-aggregation session" in world.errors()[-1]
    assert len(world.victim.attempts) == 1  # whether or not the first was ever unmasked


def test_a_failure_after_the_charge_is_not_a_free_retry(tmp_path, federation):
    # Finding 5: a refusal after the charge recorded nothing, so the round could be asked again.
    world = World(tmp_path, federation)
    for run in (1, 2, 3):
        session = world.session(run, clipping_range=1e-9)  # every update value is out of range
        world.collect(session, 1, privacy=PLANS["both levels"])
    assert len(world.victim.attempts) == 1
    failures = [e for e in world.errors() if "secure-aggregation range" in e]
    assert len(failures) == 3 and len(set(failures)) == 1


def test_an_update_that_failed_before_its_noise_leaves_as_noise_only(
    tmp_path, federation, monkeypatch
):
    # Finding 5, the other half: under enterprise-level DP, "non-finite" or "unchanged" was a bit
    # about un-noised training. Now such an update is a zero update, noised like any other.
    def nothing_learned(model, rows, settings, seed, device):
        return LocalTrainResult(mean_loss=1.0, steps=1, sequences_seen=2, expert_load={})

    monkeypatch.setattr(enterprise, "train_local", nothing_learned)
    world = World(tmp_path, federation)
    world.parties[1].fit(1, world.adapter, world.config(1))
    assert world.errors() == [] and len(world.victim.outputs) == 1
    noise = world.victim.ledger.draw(world.victim.ledger.entries()[0][0], 1).release.arrays[0]
    assert 0 < np.linalg.norm(noise) and np.isfinite(noise).all()


def test_the_record_count_never_shows_in_a_handshake(tmp_path, federation):
    # Finding 6: bisecting the run's delta over free handshakes pinned N exactly.
    half = tmp_path / "half"
    half.mkdir()
    lines = (make_victim(tmp_path, federation).node.data / "train.jsonl").read_text()
    (half / "train.jsonl").write_text("\n".join(lines.splitlines()[:100]) + "\n")
    source = make_victim(tmp_path, federation).node.data / "heldout.jsonl"
    (half / "heldout.jsonl").write_text(source.read_text())
    worlds = [
        World(tmp_path / "full", federation, budget=NodeBudget(delta=1e-3)),
        World(tmp_path / "half-node", federation, data=half, budget=NodeBudget(delta=1e-3)),
    ]
    answers = [[], []]
    for delta in (0.5, 0.1, 0.02, 0.009, 0.005, 0.002, 1e-3, 1e-4):
        privacy = {"record": {"epsilon": 8.0, "delta": delta}}
        for world, seen in zip(worlds, answers, strict=True):
            seen.append(world.victim.budget(world.config(1, privacy)))
    assert answers[0] == answers[1]
    assert [a["accept"] for a in answers[0]] == [False] * 6 + [True] * 2


def test_a_node_whose_own_delta_does_not_fit_its_data_says_so_the_same_way_every_time(
    tmp_path, federation
):
    world = World(tmp_path, federation, budget=NodeBudget(delta=5e-3))  # 1/5e-3 = 200 records
    privacy = {"record": {"epsilon": 8.0, "delta": 1e-6}}
    reasons = {world.victim.budget(world.config(1, privacy))["reason"] for _ in range(3)}
    assert len(reasons) == 1 and "budget.delta" in reasons.pop()


def test_fit_replies_under_record_level_dp_leave_at_a_fixed_time(tmp_path, federation, capsys):
    # Finding 7: four times the records gave 3.2x the fit latency. The hold leaves room for a
    # loaded CI machine: the promise holds only while training fits inside it.
    world = World(tmp_path, federation, fit_reply_s=5.0, budget=NodeBudget())
    took = []
    for server_round, rate in ((1, 0.005), (2, 0.05)):  # about 2 and 20 records a step
        privacy = {"record": {"epsilon": 8.0, "sample_rate": rate}}
        started = time.monotonic()
        config = world.config(server_round, privacy, rounds=3, run_uid=f"{server_round:032x}")
        world.parties[1].fit(1, world.adapter, config)
        took.append(time.monotonic() - started)
    assert world.errors() == []
    assert "longer than fit_reply_s" not in capsys.readouterr().out
    assert all(5.0 <= t < 7.0 for t in took) and abs(took[0] - took[1]) < 1.0, took


def test_a_public_run_under_secagg_sends_only_the_masked_vector(tmp_path, federation):
    # Finding 8: per-node expert load, norm, loss, held-out loss, duration beside the masked vector.
    world = World(tmp_path, federation, budget=NodeBudget())
    session = world.session(1)
    world.collect(session, 1, privacy={})
    reply = next(r for r in world.parties[1].replies if masked_vector(r) is not None)
    assert set(reply.content.config_records[RECORD_KEY_CONFIGS]) == {Key.MASKED_PARAMETERS}
    assert set(compat.recorddict_to_fitres(reply.content, True).metrics) <= PRIVATE_METRICS


def test_fields_that_do_not_change_the_noise_keep_one_run_on_the_ledger(tmp_path, federation):
    # Finding 9: accept_noisy_plan (or the batch size, or the audit) split one run into several.
    world = World(tmp_path, federation)
    variants = [
        PRIVATE,
        {**PRIVATE, "accept_noisy_plan": True},
        {**PRIVATE, "audit": {"canaries": 10}},
    ]
    for server_round, privacy in enumerate(variants, 1):
        world.parties[1].fit(1, world.adapter, world.config(server_round, privacy))
    keys = {run for run, *_ in world.victim.ledger.entries()}
    assert len(keys) == 1 and len(world.victim.attempts) == 3
    epsilons = [m["epsilon_enterprise"] for *_, m in world.victim.outputs]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 3  # composed within the run
    assert np.isfinite(epsilons).all()

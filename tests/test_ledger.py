"""The node's privacy ledger: refuses before overspending, survives restarts, never double-spends."""

import math
import multiprocessing as mp

import pytest

from fedmoe.client.ledger import BudgetExceeded, PrivacyLedger


def per_round(record: float, enterprise: float = math.inf):
    """A plan whose run epsilon grows by a fixed amount per release (enough for the ledger's logic)."""
    return lambda level, k: ((record if level == "record" else enterprise) * k, 1e-5)


def test_a_round_over_the_lifetime_budget_is_refused_and_nothing_is_recorded(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    budgets = {"record": 2.5, "enterprise": None}
    for r in (1, 2):
        ledger.charge("run-a", r, per_round(1.0), budgets, max_releases=10)
    spends, problem = ledger.preview("run-a", 3, per_round(1.0), budgets, max_releases=10)
    assert "past its record-level lifetime budget of 2.5" in problem
    assert "2.0" not in problem  # its spend in other runs is the node's own business
    with pytest.raises(BudgetExceeded):
        ledger.charge("run-a", 3, per_round(1.0), budgets, max_releases=10)
    assert ledger.lifetime("record") == 2.0 and len(ledger.entries()) == 4


def test_the_ledger_survives_a_restart_and_runs_add_up(tmp_path):
    path = tmp_path / "l.sqlite"
    PrivacyLedger(path).charge("run-a", 1, per_round(1.5), {"record": 4.0}, max_releases=5)
    restarted = PrivacyLedger(path)  # a new process: the spend is still there
    restarted.charge("run-b", 1, per_round(1.5), {"record": 4.0}, max_releases=5)
    assert restarted.lifetime("record") == 3.0
    with pytest.raises(BudgetExceeded):
        PrivacyLedger(path).charge("run-c", 1, per_round(1.5), {"record": 4.0}, max_releases=5)


def test_a_level_without_a_guarantee_is_refused_by_a_node_with_a_budget_at_that_level(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    _, problem = ledger.preview("run", 1, per_round(1.0), {"enterprise": 10.0}, max_releases=5)
    assert "gives no enterprise-level privacy guarantee" in problem
    # Without a budget it is recorded honestly, as an infinite spend.
    ledger.charge("run", 1, per_round(1.0), {}, max_releases=5)
    assert ledger.lifetime("enterprise") == math.inf


def test_a_run_cannot_take_more_rounds_than_its_plan_covers(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    ledger.charge("run", 1, per_round(0.1), {}, max_releases=1)
    with pytest.raises(BudgetExceeded, match="all 1 rounds"):
        ledger.charge("run", 2, per_round(0.1), {}, max_releases=1)


def _spend(path, worker):
    try:
        PrivacyLedger(path).charge(
            f"run-{worker}", 1, per_round(1.0), {"record": 3.0}, max_releases=1
        )
        return True
    except BudgetExceeded:
        return False


def test_concurrent_processes_never_spend_past_the_budget(tmp_path):
    path = tmp_path / "l.sqlite"
    PrivacyLedger(path)
    with mp.get_context("spawn").Pool(4) as pool:
        granted = pool.starmap(_spend, [(path, w) for w in range(8)])
    assert sum(granted) == 3 and PrivacyLedger(path).lifetime("record") == 3.0

"""Prometheus /metrics: the coordinator's collector against the run database it reads, the
agent's against a real node's ledger and refusals, and the coordinator's endpoint over HTTPS.
Every scrape goes through prometheus_client's own text format and parser, as Prometheus reads
it. (tests/test_deployment.py scrapes both from a live deployment.)"""

from __future__ import annotations

import datetime as dt
import math
import ssl
import urllib.error
import urllib.request

import pytest
from conftest import round_config
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fedmoe.cli.agent import ledger_rows
from fedmoe.client.enterprise import EnterpriseNode, workspace
from fedmoe.client.ledger import ReplayRefused
from fedmoe.client.metrics import REASON_CHARS, AgentCollector
from fedmoe.client.settings import NodeSettings
from fedmoe.contract.round import LocalTrainSettings
from fedmoe.coordinator.service.certs import make_dev_certificates
from fedmoe.coordinator.service.metrics import (
    DURATION_BUCKETS,
    FINISHED_RUNS,
    coordinator_registry,
    serve_metrics,
)
from fedmoe.coordinator.store.db import (
    FINAL_STATUSES,
    RUN_STATUSES,
    ParticipationRecord,
    RoundRecord,
    RunStore,
)
from fedmoe.model.corpus import DEMO_DATA_DIR
from fedmoe.model.lora import get_adapter_vector
from fedmoe.model.settings import LoraSettings
from fedmoe.privacy.settings import NodeBudget

PLAN = {"secure_aggregation": True, "record": {"epsilon": 8.0}, "enterprise": {"epsilon": 4.0}}


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, as Prometheus' parser reads the exposition text."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    return parse(generate_latest(registry).decode())


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: dict, name: str) -> dict[frozenset, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def _round(number, seconds, status="completed", bytes_up=100, participations=()):
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=number)
    return RoundRecord(
        number=number,
        started_at=start,
        ended_at=start + dt.timedelta(seconds=seconds),
        status=status,
        bytes_up=bytes_up,
        bytes_down=2 * bytes_up + number,
        participations=list(participations),
    )


def _ok(enterprise, record, entp):
    return ParticipationRecord(
        node_id=enterprise, status="ok", enterprise=enterprise,
        epsilon_record=record, epsilon_enterprise=entp,
    )  # fmt: skip


@pytest.fixture
def store(database_url):
    """Runs in every status: a private completed run, a running one with a failed round, a
    queued one, and more finished runs than get series of their own (SQLite and PostgreSQL)."""
    store = RunStore(database_url)
    old = [store.create_run({}, planned_rounds=1) for _ in range(FINISHED_RUNS)]
    for run_id in old:
        store.finish_run(run_id, "stopped")
    private = store.create_run({}, planned_rounds=3, privacy_plan=PLAN)
    store.record_round(private, _round(1, 3.0, participations=[_ok("finance", 1.5, 0.5)]))
    refused = ParticipationRecord(node_id="f", status="refused", enterprise="finance", error="x")
    store.record_round(
        private,
        _round(2, 40.0, participations=[_ok("clinical", 2.0, 1.0), refused, _ok("x", None, 0.7)]),
    )
    store.record_round(private, _round(3, 700.0, participations=[_ok("clinical", 3.5, 1.5)]))
    store.finish_run(private, "completed")
    running = store.create_run({}, planned_rounds=4, privacy_plan={"secure_aggregation": False})
    store.mark_running(running)
    store.record_round(running, _round(1, 12.5, bytes_up=7))
    store.record_round(running, _round(2, 1.0, status="failed", bytes_up=9))
    store.create_run({}, planned_rounds=2)  # queued
    for name in ("finance", "clinical", "gone"):
        store.register_node(name, f"key-{name}", f"fp-{name}", "1", by="ops")
    store.revoke_node("gone", by="ops")
    yield store
    store.close()


def test_the_coordinator_collector_reports_what_the_database_holds(store):
    samples = scrape(coordinator_registry(store, lambda: 2))
    runs = store.runs()
    rounds = [r for run in runs for r in store.rounds(run.id)]
    committed = [r for r in rounds if r.status == "completed"]
    for status in RUN_STATUSES:
        count = sum(run.status == status for run in runs)
        assert value(samples, "fedmoe_runs", status=status) == count
    assert value(samples, "fedmoe_rounds_committed_total") == len(committed) == 4
    assert value(samples, "fedmoe_rounds_failed_total") == 1
    durations = [(r.ended_at - r.started_at).total_seconds() for r in committed]
    assert value(samples, "fedmoe_round_duration_seconds_count") == len(durations)
    assert value(samples, "fedmoe_round_duration_seconds_sum") == pytest.approx(sum(durations))
    for bound in DURATION_BUCKETS:
        below = sum(d <= bound for d in durations)
        assert value(samples, "fedmoe_round_duration_seconds_bucket", le=str(bound)) == below
    assert value(samples, "fedmoe_round_duration_seconds_bucket", le="+Inf") == len(durations)
    for direction in ("up", "down"):
        total = sum(getattr(r, f"bytes_{direction}") for r in rounds)
        assert value(samples, "fedmoe_round_bytes_total", direction=direction) == total
    last = max(committed, key=lambda r: r.id)  # the running run's round 1, committed last
    assert (last.bytes_up, last.bytes_down) == (7, 15)
    assert value(samples, "fedmoe_last_round_bytes", direction="up") == last.bytes_up
    assert value(samples, "fedmoe_last_round_bytes", direction="down") == last.bytes_down
    assert value(samples, "fedmoe_nodes_registered") == len(store.nodes()) == 2
    assert value(samples, "fedmoe_nodes_online") == 2


def test_per_run_series_cover_unfinished_runs_and_the_latest_finished_ones(store):
    samples = scrape(coordinator_registry(store, lambda: 0))
    runs = store.runs()
    finished = [r for r in runs if r.status in FINAL_STATUSES][-FINISHED_RUNS:]
    shown = [*(r for r in runs if r.status not in FINAL_STATUSES), *finished]
    assert len(runs) == FINISHED_RUNS + 3 and len(shown) == FINISHED_RUNS + 2
    completed = series(samples, "fedmoe_run_rounds_completed")
    assert completed == {
        frozenset({("run", str(r.id))}): sum(x.status == "completed" for x in store.rounds(r.id))
        for r in shown
    }
    planned = series(samples, "fedmoe_run_rounds_planned")
    assert planned == {frozenset({("run", str(r.id))}): r.planned_rounds for r in shown}
    private = next(r for r in runs if r.privacy_plan == PLAN)
    assert series(samples, "fedmoe_epsilon_target") == {
        frozenset({("run", str(private.id)), ("level", "record")}): 8.0,
        frozenset({("run", str(private.id)), ("level", "enterprise")}): 4.0,
    }
    # The latest epsilon each enterprise reported, per level, from the database's rows.
    latest = {}
    for r in store.rounds(private.id):
        for p in r.participations:
            for level in ("record", "enterprise"):
                if (eps := getattr(p, f"epsilon_{level}")) is not None:
                    latest[(p.enterprise, level)] = eps
    assert latest[("clinical", "record")] == 3.5 and ("x", "record") not in latest
    assert series(samples, "fedmoe_epsilon_spent") == {
        frozenset({("run", str(private.id)), ("enterprise", e), ("level", lv)}): eps
        for (e, lv), eps in latest.items()
    }


def test_a_superlink_that_cannot_answer_leaves_only_the_online_gauge_out(store):
    def down() -> int:
        raise ConnectionError("the SuperLink is restarting")

    samples = scrape(coordinator_registry(store, down))
    assert not series(samples, "fedmoe_nodes_online")
    assert value(samples, "fedmoe_nodes_registered") == 2


def test_an_empty_database_scrapes_zeros(tmp_path):
    store = RunStore(f"sqlite:///{tmp_path / 'empty.db'}")
    samples = scrape(coordinator_registry(store, lambda: 0))
    assert all(value(samples, "fedmoe_runs", status=s) == 0 for s in RUN_STATUSES)
    assert value(samples, "fedmoe_rounds_committed_total") == 0
    assert value(samples, "fedmoe_round_duration_seconds_count") == 0
    assert value(samples, "fedmoe_round_bytes_total", direction="up") == 0
    assert not series(samples, "fedmoe_last_round_bytes")
    store.close()


def test_the_coordinator_serves_metrics_over_https_only(store, tmp_path):
    certs = tmp_path / "certs"
    make_dev_certificates(certs, [])
    registry = coordinator_registry(store, lambda: 1)
    server = serve_metrics(
        "127.0.0.1:0", registry, str(certs / "server.pem"), str(certs / "server.key")
    )
    try:
        verified = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        url = f"https://localhost:{server.port}/metrics"
        with urllib.request.urlopen(url, context=verified, timeout=10) as response:
            samples = parse(response.read().decode())
        assert samples == scrape(registry)
        with pytest.raises(OSError):  # a plain-HTTP client gets no answer
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=5)
    finally:
        server.stop()


# --- the agent ------------------------------------------------------------------------------------
LORA = LoraSettings(r=4, alpha=8)
TRAIN = LocalTrainSettings(local_steps=2, batch_size=4, seq_len=32)
PRIVATE = {"record": {"epsilon": 8.0}, "enterprise": {"epsilon": 8.0, "clip": 0.05}}


def test_the_agent_collector_reports_the_ledger_and_the_nodes_refusals(tmp_path):
    settings = NodeSettings(
        enterprise="finance",
        data=DEMO_DATA_DIR / "finance",
        ledger=tmp_path / "ledger.sqlite",
        budget=NodeBudget(record_epsilon=30.0),
    )
    node = EnterpriseNode(settings)
    ws = workspace(settings, LORA, TRAIN.seq_len)
    registry = CollectorRegistry()
    registry.register(AgentCollector(node.ledger, node.budgets, node.refusals))
    before = scrape(registry)
    assert value(before, "fedmoe_agent_refusals_total") == 0
    assert not series(before, "fedmoe_agent_last_refusal_timestamp_seconds")
    assert not series(before, "fedmoe_agent_last_refusal_info")

    adapter = [get_adapter_vector(ws.model).copy()]
    config = round_config(ws, PRIVATE, 1, lora=LORA, train=TRAIN)
    node.fit(adapter, config, secure_sum=None)
    public = round_config(ws, {}, 1, lora=LORA, train=TRAIN, run_uid="e" * 32)
    assert node.budget(public)["accept"] is False  # no record-level guarantee, and a budget
    with pytest.raises(ReplayRefused):  # the same round again, from another adapter
        node.fit([adapter[0] + 1.0], config, secure_sum=None)

    samples = scrape(registry)
    rows = ledger_rows(node.ledger)  # what `fedmoe agent ledger` shows
    for level in ("record", "enterprise"):
        shown = rows["lifetime"][level]["epsilon"]
        assert value(samples, "fedmoe_agent_lifetime_epsilon", level=level) == shown > 0
    assert series(samples, "fedmoe_agent_budget_epsilon") == {
        frozenset({("level", "record")}): 30.0
    }
    assert value(samples, "fedmoe_agent_charges_total") == len(rows["entries"]) == 2
    assert value(samples, "fedmoe_agent_rounds_released_total") == 1
    assert value(samples, "fedmoe_agent_refusals_total") == node.refusals.count == 2
    stamp = value(samples, "fedmoe_agent_last_refusal_timestamp_seconds")
    assert math.isclose(stamp, node.refusals.last_at)
    reason = node.refusals.last_reason
    assert "another global adapter" in reason
    info = series(samples, "fedmoe_agent_last_refusal_info")
    assert info == {frozenset({("reason", reason[:REASON_CHARS])}): 1.0}

"""An enterprise agent's Prometheus /metrics: its own ledger and its own refusals.

For the enterprise's operator only, and sent nowhere: it leaves the node solely through this
endpoint, which the operator turns on (`metrics_address` in agent.toml; off when unset) and binds
where only their own monitoring reaches (plain HTTP). The ledger's values are read from its file
at every scrape, with the sums `fedmoe agent ledger` prints (`PrivacyLedger.lifetime`); refusals
are counted by the agent's process since it started (`Refusals`), as a refused round leaves
nothing on the ledger.

| metric | type | labels | meaning |
|---|---|---|---|
| `fedmoe_agent_lifetime_epsilon` | gauge | level (record, enterprise) | lifetime spend across runs, as `fedmoe agent ledger` shows it (+Inf: a run gave no guarantee at that level) |
| `fedmoe_agent_budget_epsilon` | gauge | level | the lifetime budget in agent.toml (levels with one) |
| `fedmoe_agent_charges_total` | counter | | spend entries on the ledger (one per level per charged round) |
| `fedmoe_agent_rounds_released_total` | counter | | rounds whose update left the node |
| `fedmoe_agent_refusals_total` | counter | | rounds refused since the agent started (budget handshake or fit) |
| `fedmoe_agent_last_refusal_timestamp_seconds` | gauge | | when the last one was refused (Unix time; absent before the first) |
| `fedmoe_agent_last_refusal_info` | info | reason | the last refusal's reason, cut to 200 characters |
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fedmoe.client.enterprise import Refusals
from fedmoe.client.ledger import LEVELS, PrivacyLedger

REASON_CHARS = 200


class AgentCollector(Collector):
    def __init__(self, ledger: PrivacyLedger, budgets: dict[str, float | None], refusals: Refusals):
        self.ledger = ledger
        self.budgets = budgets
        self.refusals = refusals

    def collect(self) -> Iterator[Metric]:
        lifetime = GaugeMetricFamily(
            "fedmoe_agent_lifetime_epsilon", "Lifetime epsilon spent, across runs", labels=["level"]
        )
        budget = GaugeMetricFamily(
            "fedmoe_agent_budget_epsilon", "Lifetime epsilon budget (agent.toml)", labels=["level"]
        )
        for level in LEVELS:
            lifetime.add_metric([level], self.ledger.lifetime(level))
            if self.budgets.get(level) is not None:
                budget.add_metric([level], self.budgets[level])
        yield from (lifetime, budget)
        yield CounterMetricFamily(
            "fedmoe_agent_charges_total", "Spend entries on the ledger", value=self.ledger.charges()
        )
        yield CounterMetricFamily(
            "fedmoe_agent_rounds_released_total",
            "Rounds whose update left the node",
            value=self.ledger.released_rounds(),
        )
        refusals = self.refusals
        yield CounterMetricFamily(
            "fedmoe_agent_refusals_total", "Rounds refused since start", value=refusals.count
        )
        if refusals.last_at is not None:
            yield GaugeMetricFamily(
                "fedmoe_agent_last_refusal_timestamp_seconds",
                "When the last round was refused",
                value=refusals.last_at,
            )
            yield InfoMetricFamily(
                "fedmoe_agent_last_refusal",
                "Why the last round was refused",
                value={"reason": refusals.last_reason[:REASON_CHARS]},
            )


def serve_agent_metrics(address: str, collector: AgentCollector) -> None:
    """Serve the collector on `address` (host:port) over plain HTTP, from a daemon thread that
    lives as long as the agent's process; its own registry, so nothing else is exported."""
    registry = CollectorRegistry()
    registry.register(collector)
    host, port = address.rsplit(":", 1)
    start_http_server(int(port), addr=host.strip("[]"), registry=registry)

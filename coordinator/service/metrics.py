"""The coordinator's Prometheus /metrics, read from the run database at every scrape.

Rounds are committed by the ServerApp in Flower's own process, not in this one, so nothing here
counts in memory: every value is a query of the run database (`RunStore.aggregates`) when
Prometheus scrapes, and stays right across restarts of the coordinator. Served over HTTPS with
the coordinator's [tls] certificate on `[metrics] address` (coordinator.toml; off when unset).

| metric | type | labels | meaning |
|---|---|---|---|
| `fedmoe_runs` | gauge | status | runs in each status (every status, zeros too) |
| `fedmoe_rounds_committed_total` | counter | | committed rounds, all runs |
| `fedmoe_rounds_failed_total` | counter | | failed rounds, all runs |
| `fedmoe_round_duration_seconds` | histogram | | committed rounds' duration (end minus start) |
| `fedmoe_round_bytes_total` | counter | direction (up, down) | bytes every recorded round moved |
| `fedmoe_last_round_bytes` | gauge | direction (up, down) | bytes of the latest committed round |
| `fedmoe_nodes_registered` | gauge | | enterprise keys registered and not revoked |
| `fedmoe_nodes_online` | gauge | | nodes connected to the SuperLink (absent if it cannot say) |
| `fedmoe_run_rounds_completed` | gauge | run | a run's committed rounds |
| `fedmoe_run_rounds_planned` | gauge | run | a run's planned rounds |
| `fedmoe_epsilon_spent` | gauge | run, enterprise, level | the latest epsilon an enterprise reported for a run (the coordinator's view; each node's ledger is the authority) |
| `fedmoe_epsilon_target` | gauge | run, level | the run's privacy plan's epsilon |

Series labelled `run` cover every queued or running run and the latest `FINISHED_RUNS` finished
ones, so their number stays bounded however many runs the database holds.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from fedmoe.coordinator.store.db import RUN_STATUSES, Aggregates, RunStore

FINISHED_RUNS = 20
# Rounds take seconds on the demo and hours on a real base: one fixed ladder covers both.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
LEVELS = ("record", "enterprise")


def cumulative_buckets(values: list[float], bounds: tuple[float, ...]) -> list[tuple[str, int]]:
    """Prometheus' histogram buckets: how many values are at most each bound, then all of them."""
    counts = [(floatToGoString(b), sum(v <= b for v in values)) for b in bounds]
    return [*counts, ("+Inf", len(values))]


class CoordinatorCollector(Collector):
    """Every metric of the table above, from one `RunStore.aggregates` call per scrape.
    `online_nodes()` counts the nodes connected to the SuperLink; if it raises, that one gauge
    is left out of the scrape."""

    def __init__(self, store: RunStore, online_nodes: Callable[[], int]):
        self.store = store
        self.online_nodes = online_nodes

    def collect(self) -> Iterator[Metric]:
        view = self.store.aggregates(FINISHED_RUNS)
        runs = GaugeMetricFamily("fedmoe_runs", "Runs in each status", labels=["status"])
        for status in RUN_STATUSES:
            runs.add_metric([status], view.runs_by_status.get(status, 0))
        yield runs
        for status, name in (("completed", "committed"), ("failed", "failed")):
            yield CounterMetricFamily(
                f"fedmoe_rounds_{name}_total",
                f"Rounds {name}, all runs",
                value=view.rounds_by_status.get(status, 0),
            )
        yield HistogramMetricFamily(
            "fedmoe_round_duration_seconds",
            "Duration of committed rounds",
            buckets=cumulative_buckets(view.round_seconds, DURATION_BUCKETS),
            sum_value=math.fsum(view.round_seconds),
        )
        total = CounterMetricFamily(
            "fedmoe_round_bytes_total", "Bytes moved by every recorded round", labels=["direction"]
        )
        total.add_metric(["up"], view.bytes_up)
        total.add_metric(["down"], view.bytes_down)
        yield total
        if view.last_round_bytes is not None:
            last = GaugeMetricFamily(
                "fedmoe_last_round_bytes",
                "Bytes of the latest committed round",
                labels=["direction"],
            )
            last.add_metric(["up"], view.last_round_bytes[0])
            last.add_metric(["down"], view.last_round_bytes[1])
            yield last
        yield GaugeMetricFamily(
            "fedmoe_nodes_registered",
            "Enterprise keys registered and not revoked",
            view.active_nodes,
        )
        try:
            online = self.online_nodes()
        except Exception:  # noqa: BLE001 - the SuperLink restarting: leave the gauge out
            pass
        else:
            yield GaugeMetricFamily("fedmoe_nodes_online", "Nodes connected now", value=online)
        yield from self._per_run(view)

    def _per_run(self, view: Aggregates) -> Iterator[Metric]:
        completed = GaugeMetricFamily(
            "fedmoe_run_rounds_completed", "A run's committed rounds", labels=["run"]
        )
        planned = GaugeMetricFamily(
            "fedmoe_run_rounds_planned", "A run's planned rounds", labels=["run"]
        )
        target = GaugeMetricFamily(
            "fedmoe_epsilon_target", "The epsilon of a run's privacy plan", labels=["run", "level"]
        )
        for run in view.recent_runs:
            completed.add_metric([str(run.id)], view.committed_rounds.get(run.id, 0))
            planned.add_metric([str(run.id)], run.planned_rounds)
            plan = run.privacy_plan or {}
            for level in LEVELS:
                if level in plan:
                    target.add_metric([str(run.id), level], plan[level]["epsilon"])
        spent = GaugeMetricFamily(
            "fedmoe_epsilon_spent",
            "The latest epsilon an enterprise reported for a run (its ledger is the authority)",
            labels=["run", "enterprise", "level"],
        )
        for (run_id, enterprise, level), epsilon in sorted(view.epsilons.items()):
            spent.add_metric([str(run_id), enterprise, level], epsilon)
        yield from (completed, planned, target, spent)


def coordinator_registry(store: RunStore, online_nodes: Callable[[], int]) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding the coordinator's
    collector only: no process or Python metrics of whatever else imported the library."""
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(store, online_nodes))
    return registry


@dataclass
class MetricsServer:
    """A running /metrics endpoint (prometheus_client's threaded WSGI server)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(
    address: str, registry: CollectorRegistry, certfile: str | None, keyfile: str | None
) -> MetricsServer:
    """Serve `registry` on `address` (host:port; port 0 picks a free one), over HTTPS when a
    certificate and its key are given."""
    host, port = address.rsplit(":", 1)
    server, thread = start_http_server(
        int(port), addr=host.strip("[]"), registry=registry, certfile=certfile, keyfile=keyfile
    )
    return MetricsServer(server, thread)

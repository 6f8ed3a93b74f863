"""Dashboard requests on a large run database: page loads over HTTPS, and whether polling slows
a round's commit.

    python benchmarks/dashboard.py [--runs 100 --rounds 50 --enterprises 30 --repeats 7]

Fills a fresh SQLite run database (runs x rounds x enterprises participations, every round with
losses, epsilon and expert load), serves the dashboard on loopback and times each page and JSON
route (median of `--repeats` warm requests; first request apart). Baseline, same run: reading the
same rows with one raw SQL query per table (the floor any page over this data pays). Then times
`RunStore.record_round` (a round's commit) from another process, alone and while viewers poll a
live run's page: polling must add no measurable time to a round.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import multiprocessing
import random
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from sqlalchemy import text

from fedmoe.coordinator.service.certs import make_dev_certificates
from fedmoe.coordinator.service.service_config import AdminSection, AdminToken
from fedmoe.coordinator.store.db import ParticipationRecord, RoundRecord, RunStore
from fedmoe.coordinator.web import pages
from fedmoe.coordinator.web.server import Dashboard, DashboardServer

TOKEN = "benchmark-token"


def fill(store: RunStore, runs: int, rounds: int, enterprises: int) -> None:
    rng = random.Random(0)
    names = [f"enterprise-{i:02d}" for i in range(enterprises)]
    start = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    plan = {"record": {"epsilon": 8.0, "delta": 1e-5, "clip": 1.0, "accountant": "rdp"}}
    for _ in range(runs):
        run_id = store.create_run(
            {"federation": {"rounds": rounds}},
            planned_rounds=rounds,
            engine="deployment",
            enterprises=names,
            started_by="ops",
            privacy_plan=plan,
        )
        store.set_base_eval(run_id, 2.0)
        for number in range(1, rounds + 1):
            store.record_round(run_id, _round(number, names, rng, start))
        store.finish_run(run_id, "completed")


def _round(number: int, names: list[str], rng: random.Random, start) -> RoundRecord:
    began = start + dt.timedelta(minutes=number)
    return RoundRecord(
        number=number,
        started_at=began,
        ended_at=began + dt.timedelta(seconds=rng.uniform(5, 9)),
        status="completed",
        bytes_up=10_000_000,
        checkpoint_path=f"runs/round-{number:03d}",
        bytes_down=20_000_000,
        train_loss=2.0 - number * 0.01,
        server_eval_loss=1.9 - number * 0.01,
        expert_load={str(layer): [rng.randrange(1000) for _ in range(64)] for layer in range(26)},
        participations=[
            ParticipationRecord(
                node_id=str(i),
                status="ok",
                enterprise=name,
                epsilon_record=0.16 * number,
                eval_loss=2.0 - number * 0.01,
                duration_s=5.0,
            )
            for i, name in enumerate(names)
        ],
    )


def commit_times(url: str, run_id: int, names: list[str], first: int, count: int) -> list[float]:
    """In its own process: commit `count` rounds of `run_id`, each timed in ms."""
    store, rng = RunStore(url, migrate=False), random.Random(first)
    now = dt.datetime.now(dt.UTC)
    times = []
    for number in range(first, first + count):
        record = _round(number, names, rng, now)
        times.append(_clock(lambda record=record: store.record_round(run_id, record)))
        time.sleep(0.2)
    store.close()
    return times


def timed(fetch, repeats: int) -> tuple[float, float]:
    first = _clock(fetch)
    return first, statistics.median(_clock(fetch) for _ in range(repeats))


def _clock(fetch) -> float:
    began = time.perf_counter()
    fetch()
    return (time.perf_counter() - began) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--enterprises", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedmoe-dashboard-bench-"))
    store = RunStore(f"sqlite:///{root / 'runs.db'}")
    began = time.perf_counter()
    fill(store, args.runs, args.rounds, args.enterprises)
    print(
        f"database: {args.runs} runs x {args.rounds} rounds x {args.enterprises} enterprises "
        f"({args.runs * args.rounds * args.enterprises:,} participations), filled in "
        f"{time.perf_counter() - began:.0f} s",
        flush=True,
    )
    make_dev_certificates(root / "certs", ["127.0.0.1"])
    admin = AdminSection(
        tokens=(AdminToken(name="ops", sha256=hashlib.sha256(TOKEN.encode()).hexdigest()),)
    )
    server = DashboardServer(
        Dashboard(store, list, admin.caller, 1.0),
        "127.0.0.1:0",
        str(root / "certs" / "server.pem"),
        str(root / "certs" / "server.key"),
    ).start()
    tls = ssl.create_default_context(cafile=str(root / "certs" / "ca.pem"))
    base = f"https://127.0.0.1:{server.port}"

    def get(path: str):
        def fetch():
            request = urllib.request.Request(base + path)
            request.add_header("Authorization", f"Bearer {TOKEN}")
            with urllib.request.urlopen(request, context=tls, timeout=60) as response:
                return response.read()

        return fetch

    def raw_rows():
        with store.engine.connect() as db:
            for table in ("runs", "rounds", "participations"):
                db.execute(text(f"SELECT * FROM {table}")).fetchall()  # noqa: S608 - fixed names

    floor_first, floor = timed(raw_rows, args.repeats)
    last = args.runs
    rows = [("raw SQL: every run, round and participation (baseline)", floor_first, floor)]
    for label, path in (
        ("runs page", "/runs"),
        ("one run's page (50 rounds x 30 enterprises)", f"/runs/{last}"),
        ("/api/runs (JSON)", "/api/runs"),
        ("/api/runs/N/rounds (JSON)", f"/api/runs/{last}/rounds"),
        ("one chart's CSV", f"/runs/{last}/data/epsilon.csv"),
        ("nodes page", "/nodes"),
    ):
        first, median = timed(get(path), args.repeats)
        rows.append((label, first, median))
    print("\n| request | first ms | median ms | vs baseline |")
    print("|---|---:|---:|---:|")
    for label, first, median in rows:
        print(f"| {label} | {first:.0f} | {median:.0f} | {median / floor:.2f}x |")

    # A round's commit, alone and while viewers poll, from another process (as the ServerApp
    # commits from Flower's process, apart from the coordinator service that serves the pages).
    names = [f"enterprise-{i:02d}" for i in range(args.enterprises)]
    live = store.create_run({}, planned_rounds=1000, engine="deployment", enterprises=names)
    store.mark_running(live)
    url = store.engine.url.render_as_string(hide_password=False)
    with multiprocessing.get_context("spawn").Pool(1) as writer:
        quiet = writer.apply(commit_times, (url, live, names, 1, args.repeats * 2))
        rows = [("alone", quiet)]
        for viewers, interval in ((10, pages.POLL_S), (4, 0.0)):
            stop = threading.Event()

            def poll(interval=interval, stop=stop):
                while not stop.is_set():
                    get(f"/runs/{live}")()
                    stop.wait(interval)

            pollers = [threading.Thread(target=poll, daemon=True) for _ in range(viewers)]
            for p in pollers:
                p.start()
            first = 1 + len(rows) * args.repeats * 2
            polled = writer.apply(commit_times, (url, live, names, first, args.repeats * 2))
            stop.set()
            for p in pollers:
                p.join()
            how = f"every {interval:g} s" if interval else "back to back"
            rows.append((f"while {viewers} viewers poll the live run's page {how}", polled))
    alone = statistics.median(quiet)
    print("\n| a round's commit (record_round, 30 participations) | median ms | vs alone |")
    print("|---|---:|---:|")
    for label, times in rows:
        print(
            f"| {label} | {statistics.median(times):.1f} | {statistics.median(times) / alone:.2f}x |"
        )
    server.stop()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The node's own privacy ledger: every release of this enterprise's data, in a local SQLite file.

This ledger, not the coordinator's database, enforces the enterprise's lifetime budget. A round's
spend is written BEFORE training starts (write-ahead): a crash after that point over-counts,
never under-counts. Check and write happen in one `BEGIN IMMEDIATE` transaction, so two processes
of the same node cannot both spend the last of the budget.

Within a run, epsilon is the accountant's value for the run so far (tighter than adding rounds
up); across runs, epsilons add up (basic composition). A round that gives no guarantee at a level
spends infinite epsilon at that level.

A round is charged once. The node keeps what it released for the latest round of each run; when
a resumed coordinator sends that round again, the node sends the same release again (post-
processing, free), or refuses if the round would not be the same release (another global
adapter, fewer noise shares) or if secure aggregation may already have unmasked a sum holding it
(a second sum over other clients could then single it out). A round that was charged but
released nothing (training failed) is trained again at no new charge.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEVELS = ("record", "enterprise")

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS spends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    round INTEGER NOT NULL,
    level TEXT NOT NULL CHECK (level IN ('record', 'enterprise')),
    epsilon_run REAL NOT NULL,  -- the run's epsilon at this level after this release
    delta REAL NOT NULL,
    recorded_at TEXT NOT NULL
)""",
    """
CREATE TABLE IF NOT EXISTS canary_seeds (
    run TEXT PRIMARY KEY,  -- a run uid: the same canaries and coins every round of the run
    seed BLOB NOT NULL     -- secret: whoever knows it knows which canaries were trained on
)""",
    """
CREATE TABLE IF NOT EXISTS releases (
    run TEXT NOT NULL,
    round INTEGER NOT NULL,
    parameters_sha256 TEXT NOT NULL,  -- the global adapter this release was trained from
    noise_shares INTEGER NOT NULL,
    unmasked INTEGER NOT NULL DEFAULT 0,  -- a SecAgg+ unmask request for this round was answered
    weight INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    arrays BLOB NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (run, round)
)""",
)

# (level, participations) -> (the run's epsilon after that many releases, delta)
EpsilonAfter = Callable[[str, int], tuple[float, float]]


class BudgetExceeded(RuntimeError):
    """The round would take the enterprise past its lifetime budget; nothing was trained."""


class ReplayRefused(RuntimeError):
    """The round was already released and cannot be released again as it is asked."""


@dataclass(frozen=True)
class Spend:
    """What one round brings a level to: the run's epsilon after it, and the node's lifetime total."""

    level: str
    epsilon_run: float
    delta: float
    lifetime: float


@dataclass(frozen=True)
class Release:
    """What left the node for one round: the privatized update, its weight and metrics."""

    arrays: list[np.ndarray]
    weight: int
    metrics: dict
    parameters_sha256: str
    noise_shares: int
    unmasked: bool


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _pack(arrays: list[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    return buffer.getvalue()


def _unpack(blob: bytes) -> list[np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


class PrivacyLedger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            for statement in _SCHEMA:
                db.execute(statement)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    @staticmethod
    def _participations(db: sqlite3.Connection, run: str, level: str) -> int:
        query = "SELECT COUNT(*) FROM spends WHERE run = ? AND level = ?"
        return db.execute(query, (run, level)).fetchone()[0]

    @staticmethod
    def _lifetime(db: sqlite3.Connection, level: str, excluding_run: str | None = None) -> float:
        rows = db.execute(
            "SELECT MAX(epsilon_run) FROM spends WHERE level = ? AND run IS NOT ? GROUP BY run",
            (level, excluding_run),
        ).fetchall()
        return math.fsum(r[0] for r in rows)

    @staticmethod
    def _charged(db: sqlite3.Connection, run: str, round_number: int) -> list[Spend]:
        rows = db.execute(
            "SELECT level, epsilon_run, delta FROM spends WHERE run = ? AND round = ? ORDER BY id",
            (run, round_number),
        ).fetchall()
        return [
            Spend(level, eps, delta, PrivacyLedger._lifetime(db, level))
            for level, eps, delta in rows
        ]

    def participations(self, run: str, level: str) -> int:
        with closing(self._connect()) as db:
            return self._participations(db, run, level)

    def lifetime(self, level: str) -> float:
        with closing(self._connect()) as db:
            return self._lifetime(db, level)

    def lifetime_delta(self, level: str) -> float:
        """Delta across runs at `level` (basic composition: the deltas of runs with a finite
        epsilon add up; a run without a guarantee has no delta to add)."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT MAX(delta), MAX(epsilon_run) FROM spends WHERE level = ? GROUP BY run",
                (level,),
            ).fetchall()
        return math.fsum(d for d, eps in rows if math.isfinite(eps))

    def canary_seed(self, run_uid: str) -> bytes:
        """This node's secret canary seed for a run, made on first use."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR IGNORE INTO canary_seeds (run, seed) VALUES (?, ?)",
                (run_uid, os.urandom(32)),
            )
            return db.execute("SELECT seed FROM canary_seeds WHERE run = ?", (run_uid,)).fetchone()[
                0
            ]

    def trained_privately(self, run_uid: str) -> bool:
        """Whether this node released anything under a finite epsilon in run `run_uid` (under
        any plan of that run)."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT epsilon_run FROM spends WHERE run = ? OR run LIKE ?",
                (run_uid, f"{run_uid}:%"),
            ).fetchall()
        return any(math.isfinite(eps) for (eps,) in rows)

    def preview(
        self,
        run: str,
        round_number: int,
        epsilon_after: EpsilonAfter,
        budgets: dict[str, float | None],
        max_releases: int,
    ) -> tuple[list[Spend], str | None]:
        """What round `round_number` of `run` would spend, and why it must be refused (None: it
        fits). A round already charged spends nothing more.

        `epsilon_after(level, participations)` is the run's epsilon at `level` after that many
        releases (math.inf where the run gives no guarantee at that level); the run's plan covers
        at most `max_releases` of them."""
        with closing(self._connect()) as db:
            return self._preview(db, run, round_number, epsilon_after, budgets, max_releases)

    def _preview(self, db, run, round_number, epsilon_after, budgets, max_releases):
        if charged := self._charged(db, run, round_number):
            return charged, None
        spends, problems = [], []
        if self._participations(db, run, LEVELS[0]) >= max_releases:
            problems.append(
                f"this node already took part in all {max_releases} rounds the run's privacy plan covers"
            )
        for level in LEVELS:
            eps_run, delta = epsilon_after(level, self._participations(db, run, level) + 1)
            others = self._lifetime(db, level, excluding_run=run)
            spends.append(Spend(level, eps_run, delta, others + eps_run))
            budget = budgets.get(level)
            if budget is None or others + eps_run <= budget:
                continue
            if math.isinf(eps_run):
                problems.append(
                    f"the run gives no {level}-level privacy guarantee and this node has a "
                    f"{level}-level budget of {budget:g}"
                )
            else:
                query = "SELECT MAX(epsilon_run) FROM spends WHERE run = ? AND level = ?"
                spent = others + (db.execute(query, (run, level)).fetchone()[0] or 0.0)
                problems.append(
                    f"{level}-level epsilon would reach {others + eps_run:.3f} after this round, above "
                    f"this node's lifetime budget of {budget:g} ({spent:.3f} spent so far)"
                )
        return spends, "; ".join(problems) or None

    def charge(
        self,
        run: str,
        round_number: int,
        epsilon_after: EpsilonAfter,
        budgets: dict[str, float | None],
        max_releases: int,
    ) -> list[Spend]:
        """Check the budget and record the round's spend atomically (a round already charged is
        not charged again); raises BudgetExceeded."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                spends, problem = self._preview(
                    db, run, round_number, epsilon_after, budgets, max_releases
                )
                if problem:
                    raise BudgetExceeded(problem)
                if not self._charged(db, run, round_number):
                    db.executemany(
                        "INSERT INTO spends (run, round, level, epsilon_run, delta, recorded_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        [
                            (run, round_number, s.level, s.epsilon_run, s.delta, _now())
                            for s in spends
                        ],
                    )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return spends

    # --- releases ---------------------------------------------------------------------------
    def record_release(self, run: str, round_number: int, release: Release) -> None:
        """Keep what left the node for this round (the run's latest), BEFORE it leaves."""
        with closing(self._connect()) as db, db:
            db.execute("DELETE FROM releases WHERE run = ?", (run,))
            db.execute(
                "INSERT INTO releases (run, round, parameters_sha256, noise_shares, unmasked, weight, "
                "metrics, arrays, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run,
                    round_number,
                    release.parameters_sha256,
                    release.noise_shares,
                    int(release.unmasked),
                    release.weight,
                    json.dumps(release.metrics),
                    _pack(release.arrays),
                    _now(),
                ),
            )

    def release(self, run: str, round_number: int) -> Release | None:
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT arrays, weight, metrics, parameters_sha256, noise_shares, unmasked FROM releases "
                "WHERE run = ? AND round = ?",
                (run, round_number),
            ).fetchone()
        if row is None:
            return None
        arrays, weight, metrics, sha, shares, unmasked = row
        return Release(_unpack(arrays), weight, json.loads(metrics), sha, shares, bool(unmasked))

    def mark_unmasked(self, run: str, round_number: int) -> None:
        """Secure aggregation is about to help unmask a sum holding this round's release: from now
        on it is never sent again (written before the node answers the unmask request)."""
        with closing(self._connect()) as db, db:
            db.execute(
                "UPDATE releases SET unmasked = 1 WHERE run = ? AND round = ?", (run, round_number)
            )

    def entries(self) -> list[tuple]:
        with closing(self._connect()) as db:
            query = (
                "SELECT run, round, level, epsilon_run, delta, recorded_at FROM spends ORDER BY id"
            )
            return db.execute(query).fetchall()

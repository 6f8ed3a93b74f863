"""The node's own privacy ledger: every release of this enterprise's data, in a local SQLite file.

This ledger, not the coordinator's database, enforces the enterprise's lifetime budget. A round's
spend is written BEFORE training starts (write-ahead): a crash after that point over-counts,
never under-counts. Check and write happen in one `BEGIN IMMEDIATE` transaction, so two processes
of the same node cannot both spend the last of the budget.

Within a run, epsilon is the accountant's value for the run so far (tighter than adding rounds
up); across runs, epsilons add up (basic composition). A round that gives no guarantee at a level
spends infinite epsilon at that level.
"""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

LEVELS = ("record", "enterprise")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    round INTEGER NOT NULL,
    level TEXT NOT NULL CHECK (level IN ('record', 'enterprise')),
    epsilon_run REAL NOT NULL,  -- the run's epsilon at this level after this release
    delta REAL NOT NULL,
    recorded_at TEXT NOT NULL
)
"""


class BudgetExceeded(RuntimeError):
    """The round would take the enterprise past its lifetime budget; nothing was trained."""


@dataclass(frozen=True)
class Spend:
    """What one round would bring a level to: the run's epsilon after it, and the node's lifetime total."""

    level: str
    epsilon_run: float
    delta: float
    lifetime: float


class PrivacyLedger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    @staticmethod
    def _participations(db: sqlite3.Connection, run: str, level: str) -> int:
        return db.execute("SELECT COUNT(*) FROM spends WHERE run = ? AND level = ?", (run, level)).fetchone()[0]

    @staticmethod
    def _lifetime(db: sqlite3.Connection, level: str, excluding_run: str | None = None) -> float:
        rows = db.execute(
            "SELECT MAX(epsilon_run) FROM spends WHERE level = ? AND run IS NOT ? GROUP BY run", (level, excluding_run)
        ).fetchall()
        return math.fsum(r[0] for r in rows)

    def participations(self, run: str, level: str) -> int:
        with closing(self._connect()) as db:
            return self._participations(db, run, level)

    def lifetime(self, level: str) -> float:
        with closing(self._connect()) as db:
            return self._lifetime(db, level)

    def preview(self, run: str, epsilon_after, budgets: dict[str, float | None], max_releases: int) -> tuple[list[Spend], str | None]:
        """What the next round of `run` would spend, and why it must be refused (None: it fits).

        `epsilon_after(level, participations)` is the run's epsilon at `level` after that many
        releases (math.inf where the run gives no guarantee at that level); the run's plan covers
        at most `max_releases` of them."""
        with closing(self._connect()) as db:
            return self._preview(db, run, epsilon_after, budgets, max_releases)

    def _preview(self, db, run, epsilon_after, budgets, max_releases) -> tuple[list[Spend], str | None]:
        spends, problems = [], []
        if self._participations(db, run, LEVELS[0]) >= max_releases:
            problems.append(f"this node already took part in all {max_releases} rounds the run's privacy plan covers")
        for level in LEVELS:
            eps_run, delta = epsilon_after(level, self._participations(db, run, level) + 1)
            others = self._lifetime(db, level, excluding_run=run)
            spends.append(Spend(level, eps_run, delta, others + eps_run))
            budget = budgets.get(level)
            if budget is None or others + eps_run <= budget:
                continue
            if math.isinf(eps_run):
                problems.append(f"the run gives no {level}-level privacy guarantee and this node has a {level}-level budget of {budget:g}")
            else:
                row = db.execute("SELECT MAX(epsilon_run) FROM spends WHERE run = ? AND level = ?", (run, level)).fetchone()
                spent = others + (row[0] or 0.0)
                problems.append(
                    f"{level}-level epsilon would reach {others + eps_run:.3f} after this round, above this node's lifetime "
                    f"budget of {budget:g} ({spent:.3f} spent so far)"
                )
        return spends, "; ".join(problems) or None

    def charge(self, run: str, round_number: int, epsilon_after, budgets: dict[str, float | None], max_releases: int) -> list[Spend]:
        """Check the budget and record the round's spend atomically; raises BudgetExceeded."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                spends, problem = self._preview(db, run, epsilon_after, budgets, max_releases)
                if problem:
                    raise BudgetExceeded(problem)
                now = dt.datetime.now(dt.timezone.utc).isoformat()
                db.executemany(
                    "INSERT INTO spends (run, round, level, epsilon_run, delta, recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
                    [(run, round_number, s.level, s.epsilon_run, s.delta, now) for s in spends],
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return spends

    def entries(self) -> list[tuple]:
        with closing(self._connect()) as db:
            return db.execute("SELECT run, round, level, epsilon_run, delta, recorded_at FROM spends ORDER BY id").fetchall()

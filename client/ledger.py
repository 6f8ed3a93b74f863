"""The node's own privacy ledger: every charge and every draw of this enterprise, in a local
SQLite file. It is the one gate between a coordinator's requests and the enterprise's data
(client/THREAT_MODEL.md): nothing trains, noises or leaves unless the ledger first recorded it.

This ledger, not the coordinator's database, enforces the enterprise's lifetime budget. A round's
spend is written BEFORE training starts (write-ahead): a crash after that point over-counts,
never under-counts. Check and write happen in one `BEGIN IMMEDIATE` transaction, so two processes
(or two Flower runs) of the same node cannot both spend the last of the budget or both draw for
one round.

Within a run, epsilon is the accountant's value for the run so far (tighter than adding rounds
up); across runs, epsilons add up (basic composition). A round that gives no guarantee at a level
spends infinite epsilon at that level.

One charge, one draw, one release: the charge of a round also opens its draw (status
`drawing`), which ends `released` (the release kept, with the session it went into) or `failed`
(the reason kept). A round asked again is answered from its draw and never trained again: the
same release into the same session (only in the clear: a SecAgg+ session never repeats), the
same failure, or a refusal. Rounds only go forward: a round below the run's latest charged round
is refused. Every draw of every run is kept.
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
CLEAR = "clear"  # the session of a release sent without secure aggregation

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
    # Ledgers before draws kept only each run's latest release: a round charged there and asked
    # again finds no draw and is refused.
    "DROP TABLE IF EXISTS releases",
    """
CREATE TABLE IF NOT EXISTS draws (
    run TEXT NOT NULL,
    round INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('drawing', 'released', 'failed')),
    session TEXT NOT NULL,  -- 'clear', or the SecAgg+ session the release went into
    parameters_sha256 TEXT NOT NULL,  -- the global adapter it is trained from
    weight INTEGER,
    metrics TEXT,
    arrays BLOB,
    reason TEXT,  -- why a failed draw failed, as the coordinator was told
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (run, round)
)""",
    """
CREATE TABLE IF NOT EXISTS identity (
    only INTEGER PRIMARY KEY CHECK (only = 1),  -- one row: whose ledger this is
    ledger_id TEXT NOT NULL,     -- random, made once: the node's witness names it
    fingerprint TEXT NOT NULL,   -- the node key's SHA256 fingerprint
    enterprise TEXT NOT NULL,
    created_at TEXT NOT NULL
)""",
    """
CREATE TABLE IF NOT EXISTS run_numbers (
    run TEXT PRIMARY KEY,  -- a run uid
    number INTEGER NOT NULL  -- the coordinator's number for it, as first given: a label only
)""",
)

# (level, participations) -> (the run's epsilon after that many releases, delta)
EpsilonAfter = Callable[[str, int], tuple[float, float]]


class BudgetExceeded(RuntimeError):
    """The round would take the enterprise past its lifetime budget; nothing was trained."""


class ReplayRefused(RuntimeError):
    """The round was already drawn, and is not drawn again; nothing was trained or charged."""


@dataclass(frozen=True)
class Spend:
    """What one round brings a level to: the run's epsilon after it, and the node's lifetime total."""

    level: str
    epsilon_run: float
    delta: float
    lifetime: float


@dataclass(frozen=True)
class Release:
    """What leaves the node for one round: the privatized update, its weight and metrics."""

    arrays: list[np.ndarray]
    weight: int
    metrics: dict


@dataclass(frozen=True)
class Draw:
    """What a round's charge was used for: a release into one session, a failure, or (status
    `drawing`) a draw under way or cut short by a crash."""

    status: str
    session: str
    parameters_sha256: str
    release: Release | None
    reason: str | None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _pack(arrays: list[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    return buffer.getvalue()


def _unpack(blob: bytes) -> list[np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


@dataclass(frozen=True)
class LedgerIdentity:
    ledger_id: str
    fingerprint: str
    enterprise: str
    created_at: str


class PrivacyLedger:
    def __init__(self, path: Path, on_charge: Callable[[int], None] | None = None):
        """`on_charge(charges)` runs after every committed charge with the ledger's count of
        spend entries (client/ledger_witness.py mirrors it beside the node's key)."""
        self.path = Path(path)
        self.on_charge = on_charge
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            for statement in _SCHEMA:
                db.execute(statement)

    def identity(self) -> LedgerIdentity | None:
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT ledger_id, fingerprint, enterprise, created_at FROM identity"
            ).fetchone()
        return None if row is None else LedgerIdentity(*row)

    def stamp(self, fingerprint: str, enterprise: str) -> LedgerIdentity:
        """Make this the ledger of the node with key `fingerprint` (once; later calls keep it)."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR IGNORE INTO identity VALUES (1, ?, ?, ?, ?)",
                (os.urandom(16).hex(), fingerprint, enterprise, _now()),
            )
        return self.identity()

    def charges(self) -> int:
        """How many spend entries the ledger holds: it only ever grows."""
        with closing(self._connect()) as db:
            return db.execute("SELECT COUNT(*) FROM spends").fetchone()[0]

    def carry(self, level: str, epsilon: float, delta: float, why: str) -> None:
        """A spend the ledger no longer holds (a rolled-back copy), kept as one entry of its own
        so the lifetime budget never goes back."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO spends (run, round, level, epsilon_run, delta, recorded_at) "
                "VALUES (?, 0, ?, ?, ?, ?)",
                (f"carried:{why}:{os.urandom(4).hex()}", level, epsilon, delta, _now()),
            )

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
        query = "SELECT MAX(round) FROM spends WHERE run = ?"
        latest = db.execute(query, (run,)).fetchone()[0]
        if latest is not None and round_number < latest:
            problems.append(
                f"round {round_number} comes after round {latest} on this node: rounds only go forward"
            )
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
            # Worded from the node's own terms only: its spend in other runs is its own business.
            if math.isinf(eps_run):
                problems.append(
                    f"the run gives no {level}-level privacy guarantee and this node has a "
                    f"{level}-level budget of {budget:g}"
                )
            else:
                problems.append(
                    f"this round would take the node past its {level}-level lifetime budget of {budget:g}"
                )
        return spends, "; ".join(problems) or None

    def charge(
        self,
        run: str,
        round_number: int,
        epsilon_after: EpsilonAfter,
        budgets: dict[str, float | None],
        max_releases: int,
        session: str = CLEAR,
        parameters_sha256: str = "",
    ) -> list[Spend]:
        """Check the budget, record the round's spend and open its one draw, atomically; raises
        BudgetExceeded (nothing recorded) or ReplayRefused (the round already has its draw)."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                if self._draw(db, run, round_number) is not None or self._charged(
                    db, run, round_number
                ):
                    raise ReplayRefused(
                        f"round {round_number} of run {run[:8]} was already charged; one draw per charge"
                    )
                spends, problem = self._preview(
                    db, run, round_number, epsilon_after, budgets, max_releases
                )
                if problem:
                    raise BudgetExceeded(problem)
                db.executemany(
                    "INSERT INTO spends (run, round, level, epsilon_run, delta, recorded_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(run, round_number, s.level, s.epsilon_run, s.delta, _now()) for s in spends],
                )
                db.execute(
                    "INSERT INTO draws (run, round, status, session, parameters_sha256, recorded_at) "
                    "VALUES (?, ?, 'drawing', ?, ?, ?)",
                    (run, round_number, session, parameters_sha256, _now()),
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        if self.on_charge is not None:
            self.on_charge(self.charges())
        return spends

    # --- draws ------------------------------------------------------------------------------
    def released(self, run: str, round_number: int, release: Release) -> None:
        """Keep what leaves the node for this round, BEFORE it leaves."""
        self._close_draw(
            run,
            round_number,
            "released",
            weight=release.weight,
            metrics=json.dumps(release.metrics),
            arrays=_pack(release.arrays),
        )

    def failed(self, run: str, round_number: int, reason: str) -> None:
        """The round's draw failed after its charge: asked again, it fails the same way."""
        self._close_draw(run, round_number, "failed", reason=reason)

    def _close_draw(self, run: str, round_number: int, status: str, **values) -> None:
        columns = ", ".join(f"{k} = ?" for k in values)
        with closing(self._connect()) as db, db:
            updated = db.execute(
                f"UPDATE draws SET status = ?, {columns}, recorded_at = ? "
                "WHERE run = ? AND round = ? AND status = 'drawing'",
                (status, *values.values(), _now(), run, round_number),
            ).rowcount
        if updated != 1:
            raise RuntimeError(f"round {round_number} of run {run[:8]} has no open draw to close")

    @staticmethod
    def _draw(db: sqlite3.Connection, run: str, round_number: int) -> Draw | None:
        row = db.execute(
            "SELECT status, session, parameters_sha256, weight, metrics, arrays, reason FROM draws "
            "WHERE run = ? AND round = ?",
            (run, round_number),
        ).fetchone()
        if row is None:
            return None
        status, session, sha, weight, metrics, arrays, reason = row
        release = None
        if status == "released":
            release = Release(_unpack(arrays), weight, json.loads(metrics))
        return Draw(status, session, sha, release, reason)

    def draw(self, run: str, round_number: int) -> Draw | None:
        """The round's draw, or None (never charged: then it is never drawn either)."""
        with closing(self._connect()) as db:
            if (found := self._draw(db, run, round_number)) is None and self._charged(
                db, run, round_number
            ):
                # Charged by a ledger that kept no draws: its release is not on record.
                return Draw("drawing", "", "", None, None)
            return found

    def latest_round(self, run: str) -> int | None:
        """The run's highest charged round (rounds only go forward)."""
        with closing(self._connect()) as db:
            return db.execute("SELECT MAX(round) FROM spends WHERE run = ?", (run,)).fetchone()[0]

    def name_run(self, run_uid: str, number: int) -> None:
        """Label a run uid with the coordinator's run number; the first label stays."""
        if number < 1:
            return
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR IGNORE INTO run_numbers (run, number) VALUES (?, ?)", (run_uid, number)
            )

    def run_numbers(self) -> dict[str, int]:
        """Run uid -> the coordinator's run number, where the node was told it."""
        with closing(self._connect()) as db:
            return dict(db.execute("SELECT run, number FROM run_numbers").fetchall())

    def entries(self) -> list[tuple]:
        with closing(self._connect()) as db:
            query = (
                "SELECT run, round, level, epsilon_run, delta, recorded_at FROM spends ORDER BY id"
            )
            return db.execute(query).fetchall()

    def released_rounds(self) -> int:
        """How many rounds' draws ended released (what left the node, every run)."""
        with closing(self._connect()) as db:
            return db.execute("SELECT COUNT(*) FROM draws WHERE status = 'released'").fetchone()[0]

"""The run database: runs, rounds and per-client participation (SQLAlchemy 2.x).

SQLite by default, any SQLAlchemy URL (PostgreSQL in production). The schema is created and
upgraded by alembic (coordinator/migrations); `RunStore` is the only writer. A round and all of
its participations are written in one transaction, so a crash never leaves half a round.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # running | completed | failed | budget_spent
    config: Mapped[dict] = mapped_column(JSON)
    privacy_plan: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # targets and calibrated noise
    base_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    planned_rounds: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    rounds: Mapped[list["Round"]] = relationship(back_populates="run", order_by="Round.number")


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # completed | failed
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    participants: Mapped[int] = mapped_column(Integer)
    failures: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    server_eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    update_norm: Mapped[float | None] = mapped_column(Float, nullable=True)
    bytes_up: Mapped[int] = mapped_column(BigInteger)
    bytes_down: Mapped[int] = mapped_column(BigInteger)
    # Distinct update vectors the coordinator received: 1 under secure aggregation (only the aggregate).
    updates_seen: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expert_load: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    checkpoint_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    run: Mapped[Run] = relationship(back_populates="rounds")
    participations: Mapped[list["Participation"]] = relationship(back_populates="round", order_by="Participation.enterprise")


class Participation(Base):
    __tablename__ = "participations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    node_id: Mapped[str] = mapped_column(String(64))
    enterprise: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(16))  # ok | failed | rejected | refused
    # The run's epsilon for this enterprise after this round (None: level off, no guarantee).
    epsilon_record: Mapped[float | None] = mapped_column(Float, nullable=True)
    epsilon_enterprise: Mapped[float | None] = mapped_column(Float, nullable=True)
    num_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    heldout_loss_before: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    update_norm: Mapped[float | None] = mapped_column(Float, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    round: Mapped[Round] = relationship(back_populates="participations")


@dataclass
class ParticipationRecord:
    node_id: str
    status: str
    enterprise: str | None = None
    epsilon_record: float | None = None
    epsilon_enterprise: float | None = None
    num_examples: int | None = None
    train_loss: float | None = None
    heldout_loss_before: float | None = None
    eval_loss: float | None = None
    update_norm: float | None = None
    duration_s: float | None = None
    error: str | None = None


@dataclass
class RoundRecord:
    number: int
    started_at: dt.datetime
    ended_at: dt.datetime
    status: str
    bytes_up: int = 0
    bytes_down: int = 0
    updates_seen: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    server_eval_loss: float | None = None
    update_norm: float | None = None
    expert_load: dict | None = None
    checkpoint_path: str | None = None
    checkpoint_sha256: str | None = None
    participations: list[ParticipationRecord] = field(default_factory=list)


def upgrade_schema(engine: Engine) -> None:
    """Bring the database to the newest schema with alembic."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    return create_engine(url, pool_pre_ping=True)


class RunStore:
    """All reads and writes of the run database."""

    def __init__(self, url: str, migrate: bool = True):
        self.engine = make_engine(url)
        if migrate:
            upgrade_schema(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def create_run(self, config: dict, planned_rounds: int) -> int:
        with self._session.begin() as s:
            run = Run(status="running", config=config, planned_rounds=planned_rounds, started_at=utcnow())
            s.add(run)
            s.flush()
            return run.id

    def set_fingerprint(self, run_id: int, base_fingerprint: str) -> None:
        with self._session.begin() as s:
            s.get(Run, run_id).base_fingerprint = base_fingerprint

    def set_privacy_plan(self, run_id: int, plan: dict) -> None:
        with self._session.begin() as s:
            s.get(Run, run_id).privacy_plan = plan

    def record_round(self, run_id: int, record: RoundRecord) -> None:
        with self._session.begin() as s:
            row = Round(
                run_id=run_id,
                **{k: v for k, v in record.__dict__.items() if k != "participations"},
                participants=sum(p.status == "ok" for p in record.participations),
                failures=sum(p.status != "ok" for p in record.participations),
            )
            row.participations = [Participation(**p.__dict__) for p in record.participations]
            s.add(row)

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        with self._session.begin() as s:
            run = s.get(Run, run_id)
            run.status, run.error, run.ended_at = status, error, utcnow()

    def runs(self) -> list[Run]:
        with self._session() as s:
            return list(s.scalars(select(Run).order_by(Run.id)))

    def run(self, run_id: int) -> Run | None:
        with self._session() as s:
            return s.get(Run, run_id)

    def privacy_ledger(self, run_id: int | None = None) -> list[tuple[Run, Round, Participation]]:
        """Every participation with its round and run, oldest first (one run, or all)."""
        with self._session() as s:
            query = select(Run, Round, Participation).join(Round, Round.run_id == Run.id).join(Participation, Participation.round_id == Round.id)
            if run_id is not None:
                query = query.where(Run.id == run_id)
            return list(s.execute(query.order_by(Run.id, Round.number, Participation.enterprise)).tuples())

    def rounds(self, run_id: int) -> list[Round]:
        with self._session() as s:
            rounds = list(s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.number)))
            for r in rounds:
                r.participations  # load while the session is open
            return rounds

    def close(self) -> None:
        self.engine.dispose()

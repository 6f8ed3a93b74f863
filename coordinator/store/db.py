"""The run database: runs, rounds, per-client participation and the node registry (SQLAlchemy 2.x).

SQLite by default, any SQLAlchemy URL (PostgreSQL in production). The schema is created and
upgraded by alembic (coordinator/store/migrations) under a lock, so two processes opening a fresh
database do not race; read-only commands open it without migrating and never create one.
`RunStore` is the only writer. A round and all of its participations are written in one
transaction, so a crash never leaves half a round.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Row,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

FINAL_STATUSES = ("completed", "failed", "budget_spent", "stopped")
RUN_STATUSES = ("queued", "running", *FINAL_STATUSES)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class DatabaseMissing(LookupError):
    """A read-only command found no fedmoe database at the URL."""


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("uid", name="uq_runs_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The run's identity on every node's ledger: stable across resumes, unique across databases.
    uid: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # one of RUN_STATUSES
    engine: Mapped[str] = mapped_column(String(16))  # simulation | deployment
    config: Mapped[dict] = mapped_column(JSON)
    privacy_plan: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # targets and noise
    # The one-run audit (privacy/audit.py): canaries, guesses, correct, the epsilon lower bound.
    audit: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # The base model's public server evaluation, what every round's is judged against.
    base_eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    base_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    planned_rounds: Mapped[int] = mapped_column(Integer)
    enterprises: Mapped[list | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The Flower run currently carrying it; a resume starts a new one.
    flower_run_id: Mapped[str | None] = mapped_column(String(24), nullable=True)
    resumes: Mapped[int] = mapped_column(Integer, default=0)
    stop_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    rounds: Mapped[list[Round]] = relationship(back_populates="run", order_by="Round.number")


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
    # Distinct update vectors the coordinator received: 1 under secure aggregation.
    updates_seen: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expert_load: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    checkpoint_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    run: Mapped[Run] = relationship(back_populates="rounds")
    participations: Mapped[list[Participation]] = relationship(
        back_populates="round", order_by="Participation.enterprise"
    )


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


class Node(Base):
    """An enterprise bound to a node public key. Only registered keys reach the SuperLink; a
    participation's enterprise comes from here, never from what a node says about itself."""

    __tablename__ = "nodes"
    __table_args__ = (
        # A key, once registered, is never registered again; one active key per enterprise.
        UniqueConstraint("fingerprint", name="uq_nodes_fingerprint"),
        Index(
            "ux_nodes_active_enterprise",
            "enterprise",
            unique=True,
            sqlite_where=text("revoked_at IS NULL"),
            postgresql_where=text("revoked_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    enterprise: Mapped[str] = mapped_column(String(64))
    public_key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(80))
    flower_node_id: Mapped[str] = mapped_column(String(24))
    registered_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    registered_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(64), nullable=True)


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


@dataclass(frozen=True)
class Aggregates:
    """The database summed up for monitoring (`RunStore.aggregates`): whole-database counts, and
    the few runs that get series of their own."""

    runs_by_status: dict[str, int]
    rounds_by_status: dict[str, int]
    bytes_up: int  # every recorded round's
    bytes_down: int
    last_round_bytes: tuple[int, int] | None  # (up, down) of the latest committed round
    round_seconds: list[float]  # every committed round's duration
    active_nodes: int
    # Every unfinished run and the latest finished ones: rows with id, status, planned_rounds,
    # privacy_plan; their committed rounds; the latest epsilon each enterprise reported in each.
    recent_runs: list
    committed_rounds: dict[int, int]
    epsilons: dict[tuple[int, str, str], float]  # (run id, enterprise, level) -> epsilon


def _sqlite_path(engine: Engine) -> Path | None:
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return Path(url.database)
    return None


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """A file lock beside a SQLite database (none for other databases or in memory)."""
    path = _sqlite_path(engine)
    if path is None:
        yield
        return
    with open(path.with_name(path.name + ".migrate-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def upgrade_schema(engine: Engine) -> None:
    """Bring the database to the newest schema with alembic, one process at a time: under a
    PostgreSQL advisory lock held for the transaction, or a SQLite file lock held until the
    transaction has committed (SQLite runs DDL outside it, so the next process must not look
    before the version row is in)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with _sqlite_file_lock(engine), engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(4242564901)"))
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def make_engine(url: str, create: bool = True) -> Engine:
    try:
        parsed = make_url(url)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises several kinds for a bad URL
        raise ValueError(f"database.url: not a SQLAlchemy URL ({err})") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if not create and not path.is_file():
            raise DatabaseMissing(
                f"no run database at {path}; start a run first or pass --database"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
    return create_engine(url, pool_pre_ping=True)


class RunStore:
    """All reads and writes of the run database.

    `migrate=False` opens an existing database as it is: read-only commands use it, so that
    looking at runs never creates a database (`DatabaseMissing` instead)."""

    def __init__(self, url: str, migrate: bool = True):
        self.engine = make_engine(url, create=migrate)
        if migrate:
            upgrade_schema(self.engine)
        elif not inspect(self.engine).has_table("runs"):
            self.engine.dispose()
            raise DatabaseMissing(f"{self.engine.url!r} holds no fedmoe runs")
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    # --- runs -------------------------------------------------------------------------------
    def create_run(
        self,
        config: dict,
        planned_rounds: int,
        engine: str = "simulation",
        enterprises: list[str] | None = None,
        started_by: str | None = None,
        privacy_plan: dict | None = None,
    ) -> int:
        with self._session.begin() as s:
            run = Run(
                uid=uuid.uuid4().hex,
                status="queued",
                engine=engine,
                config=config,
                planned_rounds=planned_rounds,
                enterprises=enterprises,
                started_at=utcnow(),
                started_by=started_by,
                privacy_plan=privacy_plan,
                resumes=0,
                stop_requested=False,
            )
            s.add(run)
            s.flush()
            return run.id

    def start_attempt(self, run_id: int, flower_run_id: str, resume: bool) -> None:
        """The run is now carried by this Flower run (a resume counts one more)."""
        with self._session.begin() as s:
            run = s.get(Run, run_id)
            run.flower_run_id = flower_run_id
            run.resumes += int(resume)

    def mark_running(self, run_id: int) -> None:
        with self._session.begin() as s:
            run = s.get(Run, run_id)
            if run.status == "queued":
                run.status = "running"

    def set_fingerprint(self, run_id: int, base_fingerprint: str) -> None:
        with self._session.begin() as s:
            s.get(Run, run_id).base_fingerprint = base_fingerprint

    def set_base_eval(self, run_id: int, loss: float) -> None:
        with self._session.begin() as s:
            s.get(Run, run_id).base_eval_loss = loss

    def request_stop(self, run_id: int) -> None:
        with self._session.begin() as s:
            s.get(Run, run_id).stop_requested = True

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> bool:
        """Record the run's final status; False (and no change) if it already had one."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final run status: {status}")
        with self._session.begin() as s:
            run = s.get(Run, run_id, with_for_update=True)
            if run.status in FINAL_STATUSES:
                return False
            run.status, run.error, run.ended_at = status, error, utcnow()
            return True

    def record_audit(self, run_id: int, audit: dict) -> None:
        with self._session.begin() as s:
            s.get(Run, run_id, with_for_update=True).audit = audit

    def runs(self, statuses: tuple[str, ...] | None = None) -> list[Run]:
        with self._session() as s:
            query = select(Run).order_by(Run.id)
            if statuses:
                query = query.where(Run.status.in_(statuses))
            return list(s.scalars(query))

    def run(self, run_id: int) -> Run | None:
        if not 1 <= run_id < 2**31:  # the id column's range: no such run
            return None
        with self._session() as s:
            return s.get(Run, run_id)

    # --- rounds -----------------------------------------------------------------------------
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

    def record_evaluation(
        self, run_id: int, number: int, eval_loss: float, losses: dict[str, float]
    ) -> bool:
        """A committed round's federated evaluation, arriving after its commit (with the next
        round's training replies): the round's loss, and each node's (by node id) where the node
        took part in it. Written once: False if the round is missing or already evaluated."""
        with self._session.begin() as s:
            row = s.scalars(
                select(Round).where(
                    Round.run_id == run_id, Round.number == number, Round.status == "completed"
                )
            ).first()
            if row is None or row.eval_loss is not None:
                return False
            row.eval_loss = eval_loss
            for participation in row.participations:
                if participation.status == "ok" and participation.node_id in losses:
                    participation.eval_loss = losses[participation.node_id]
            return True

    def rounds(self, run_id: int, after: int = 0) -> list[Round]:
        with self._session() as s:
            query = select(Round).where(Round.run_id == run_id, Round.number > after)
            query = query.options(selectinload(Round.participations))  # one query, not one a round
            return list(s.scalars(query.order_by(Round.number)))

    def last_round(self, run_id: int) -> Round | None:
        """The last round the run recorded (completed or failed), or None."""
        with self._session() as s:
            query = select(Round).where(Round.run_id == run_id).order_by(Round.number.desc())
            return s.scalars(query.limit(1)).first()

    def last_checkpoint(self, run_id: int) -> Round | None:
        """The last completed round with a checkpoint: where a resumed run starts from."""
        with self._session() as s:
            query = select(Round).where(
                Round.run_id == run_id,
                Round.status == "completed",
                Round.checkpoint_path.is_not(None),
            )
            return s.scalars(query.order_by(Round.number.desc()).limit(1)).first()

    def privacy_ledger(self, run_id: int | None = None) -> list[tuple[Run, int, Row]]:
        """Every participation (the columns the privacy ledger shows) with its round's number
        and its run, oldest first (one run, or all). Rows, not objects, and each run read once:
        a large federation's ledger is many thousand rows."""
        with self._session() as s:
            query = select(
                Round.run_id,
                Round.number,
                Participation.enterprise,
                Participation.node_id,
                Participation.status,
                Participation.error,
                Participation.epsilon_record,
                Participation.epsilon_enterprise,
            ).join(Participation, Participation.round_id == Round.id)
            runs = select(Run)
            if run_id is not None:
                query, runs = query.where(Round.run_id == run_id), runs.where(Run.id == run_id)
            by_id = {run.id: run for run in s.scalars(runs)}
            order = (Round.run_id, Round.number, Participation.enterprise)
            rows = s.execute(query.order_by(*order))
            return [(by_id[row.run_id], row.number, row) for row in rows if row.run_id in by_id]

    # --- node registry ----------------------------------------------------------------------
    def register_node(
        self,
        enterprise: str,
        public_key: str,
        fingerprint: str,
        flower_node_id: str,
        by: str | None,
    ) -> Node:
        with self._session.begin() as s:
            node = Node(
                enterprise=enterprise,
                public_key=public_key,
                fingerprint=fingerprint,
                flower_node_id=flower_node_id,
                registered_at=utcnow(),
                registered_by=by,
            )
            s.add(node)
            return node

    def revoke_node(self, enterprise: str, by: str | None) -> Node | None:
        with self._session.begin() as s:
            node = s.scalars(
                select(Node).where(Node.enterprise == enterprise, Node.revoked_at.is_(None))
            ).first()
            if node is not None:
                node.revoked_at, node.revoked_by = utcnow(), by
            return node

    def nodes(self, include_revoked: bool = False) -> list[Node]:
        with self._session() as s:
            query = select(Node).order_by(Node.enterprise, Node.id)
            if not include_revoked:
                query = query.where(Node.revoked_at.is_(None))
            return list(s.scalars(query))

    def node_by_key(self, fingerprint: str) -> Node | None:
        with self._session() as s:
            return s.scalars(select(Node).where(Node.fingerprint == fingerprint)).first()

    # --- aggregates -------------------------------------------------------------------------
    def aggregates(self, finished_runs: int = 20) -> Aggregates:
        """A handful of grouped queries, cheap enough for every scrape of /metrics: totals over
        the whole database, and per-run values for unfinished runs plus the latest
        `finished_runs` finished ones only, so that the number of series stays bounded."""
        committed = Round.status == "completed"
        with self._session() as s:
            by_run_status = select(Run.status, func.count()).group_by(Run.status)
            by_round_status = select(Round.status, func.count()).group_by(Round.status)
            sums = select(func.sum(Round.bytes_up), func.sum(Round.bytes_down))
            up, down = s.execute(sums).one()
            last = select(Round.bytes_up, Round.bytes_down).where(committed)
            last = s.execute(last.order_by(Round.id.desc()).limit(1)).first()
            spans = s.execute(select(Round.started_at, Round.ended_at).where(committed))
            active = select(func.count(Node.id)).where(Node.revoked_at.is_(None))
            columns = (Run.id, Run.status, Run.planned_rounds, Run.privacy_plan)
            unfinished = select(*columns).where(Run.status.not_in(FINAL_STATUSES))
            finished = select(*columns).where(Run.status.in_(FINAL_STATUSES))
            finished = finished.order_by(Run.id.desc()).limit(finished_runs)
            recent = sorted([*s.execute(unfinished), *s.execute(finished)], key=lambda r: r.id)
            ids = [r.id for r in recent]
            per_run = select(Round.run_id, func.count()).where(committed, Round.run_id.in_(ids))
            reported = (
                select(Round.run_id, Participation.enterprise, Participation.node_id)
                .add_columns(Participation.epsilon_record, Participation.epsilon_enterprise)
                .join(Participation, Participation.round_id == Round.id)
                .where(Round.run_id.in_(ids))
                .order_by(Round.number)
            )
            epsilons = {}  # in round order: the last one reported stays
            for run_id, enterprise, node_id, *levels in s.execute(reported):
                for level, eps in zip(("record", "enterprise"), levels, strict=True):
                    if eps is not None:
                        epsilons[(run_id, enterprise or node_id, level)] = eps
            return Aggregates(
                runs_by_status=dict(s.execute(by_run_status).all()),
                rounds_by_status=dict(s.execute(by_round_status).all()),
                bytes_up=up or 0,
                bytes_down=down or 0,
                last_round_bytes=None if last is None else (last[0], last[1]),
                round_seconds=[(end - start).total_seconds() for start, end in spans],
                active_nodes=s.scalar(active),
                recent_runs=recent,
                committed_rounds=dict(s.execute(per_run.group_by(Round.run_id)).all()),
                epsilons=epsilons,
            )

    def run_digests(self) -> dict[int, RunDigest]:
        """Per run, what its summary needs and no more (the runs page, ListRuns): each round's
        status and server loss, the most epsilon spent per level, and the enterprises' losses
        only for runs whose result they decide (no server evaluation). A few aggregate queries
        instead of every participation as an object."""
        with self._session() as s:
            light = select(
                Round.run_id, Round.number, Round.status, Round.checkpoint_path
            ).add_columns(Round.server_eval_loss)
            digests: dict[int, RunDigest] = {}
            by_number: dict[tuple[int, int], RoundDigest] = {}
            for run_id, *fields in s.execute(light.order_by(Round.run_id, Round.number)):
                digest = by_number[(run_id, fields[0])] = RoundDigest(*fields)
                digests.setdefault(run_id, RunDigest()).rounds.append(digest)
            spent = (
                select(Round.run_id)
                .add_columns(func.max(Participation.epsilon_record))
                .add_columns(func.max(Participation.epsilon_enterprise))
                .join(Participation, Participation.round_id == Round.id)
                .group_by(Round.run_id)
            )
            for run_id, record, enterprise in s.execute(spent):
                digests[run_id].epsilon_spent = {"record": record, "enterprise": enterprise}
            by_enterprises = [
                run_id
                for run_id, base in s.execute(select(Run.id, Run.base_eval_loss))
                if run_id in digests
                and (
                    base is None or all(r.server_eval_loss is None for r in digests[run_id].rounds)
                )
            ]
            losses = (
                select(Round.run_id, Round.number, Participation.enterprise)
                .add_columns(Participation.eval_loss, Participation.heldout_loss_before)
                .join(Participation, Participation.round_id == Round.id)
                .where(Round.run_id.in_(by_enterprises))
            )
            for run_id, number, *fields in s.execute(losses):
                if (run_id, number) in by_number:  # else committed since the first query
                    by_number[(run_id, number)].participations.append(LossDigest(*fields))
            return digests

    def close(self) -> None:
        self.engine.dispose()


@dataclass
class LossDigest:
    enterprise: str | None
    eval_loss: float | None
    heldout_loss_before: float | None


@dataclass
class RoundDigest:
    """The fields of a Round that a run's summary reads (outcome.py takes either)."""

    number: int
    status: str
    checkpoint_path: str | None
    server_eval_loss: float | None
    participations: list[LossDigest] = field(default_factory=list)


@dataclass
class RunDigest:
    rounds: list[RoundDigest] = field(default_factory=list)
    epsilon_spent: dict[str, float | None] = field(default_factory=dict)

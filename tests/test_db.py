"""The run database on SQLite and on a real PostgreSQL: schema, round writes, atomicity."""

import datetime as dt

import pytest
from sqlalchemy.exc import IntegrityError

from fedmoe.coordinator.store.db import Base, ParticipationRecord, RoundRecord, RunStore


def _round(number, participations=None):
    now = dt.datetime.now(dt.UTC)
    return RoundRecord(
        number=number,
        started_at=now,
        ended_at=now,
        status="completed",
        bytes_up=10,
        bytes_down=20,
        train_loss=1.5,
        eval_loss=1.25,
        expert_load={"1": [3, 1]},
        checkpoint_path="/x",
        checkpoint_sha256="ab" * 32,
        participations=participations
        or [
            ParticipationRecord(
                node_id="1",
                status="ok",
                enterprise="finance",
                num_examples=5,
                train_loss=1.0,
                eval_loss=0.5,
            ),
            ParticipationRecord(node_id="2", status="failed", enterprise="clinical", error="boom"),
        ],
    )


def test_runs_rounds_and_participations_round_trip(database_url):
    store = RunStore(database_url)
    run_id = store.create_run({"federation": {"rounds": 2}}, planned_rounds=2)
    store.set_fingerprint(run_id, "f" * 64)
    store.record_round(run_id, _round(1))
    store.finish_run(run_id, "completed")
    run = store.run(run_id)
    assert (
        run.status == "completed"
        and run.config == {"federation": {"rounds": 2}}
        and run.ended_at is not None
    )
    (r,) = store.rounds(run_id)
    assert (r.number, r.participants, r.failures, r.expert_load) == (1, 1, 1, {"1": [3, 1]})
    assert [(p.enterprise, p.status) for p in r.participations] == [
        ("clinical", "failed"),
        ("finance", "ok"),
    ]
    store.close()
    # Reopening runs the migrations again (a no-op) and sees the same data.
    assert RunStore(database_url).runs()[0].id == run_id


def test_a_failed_round_write_leaves_nothing_behind(database_url):
    store = RunStore(database_url)
    run_id = store.create_run({}, planned_rounds=1)
    store.record_round(run_id, _round(1))
    bad = _round(1, [ParticipationRecord(node_id="9", status="ok", enterprise="x")])
    with pytest.raises(IntegrityError):
        store.record_round(run_id, bad)  # same round number twice
    (r,) = store.rounds(run_id)
    assert {p.node_id for p in r.participations} == {"1", "2"}


def test_migrations_produce_the_models_schema(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    store = RunStore(database_url)
    with store.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_a_run_whose_last_log_lines_were_lost_is_told_from_the_database(tmp_path, capsys):
    from fedmoe.coordinator.config import load_run_config
    from fedmoe.coordinator.launcher import _print_from_database

    config = load_run_config(None, {"federation.rounds": 2})
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    run_id = store.create_run(config.to_toml_dict(), planned_rounds=2)
    store.set_base_eval(run_id, 2.0)
    for number in (1, 2):
        record = _round(number)
        record.server_eval_loss = 1.0 + number / 10
        store.record_round(run_id, record)
    store.finish_run(run_id, "completed")
    _print_from_database(store, run_id, config, printed={1})
    out = capsys.readouterr().out
    assert "round 1/" not in out and "[fedmoe] round 2/2 | clients 1/3" in out
    assert f"run {run_id} completed" in out and "round 1, server eval 1.1" in out

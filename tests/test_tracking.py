"""Experiment trackers ([tracking]): what MLflow and TensorBoard hold is what the run database
holds, read back with each tool's own reader; a tracker that fails never stops the run; the
section is validated, resolved and kept from the nodes."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedmoe.coordinator import config as config_module
from fedmoe.coordinator.config import (
    ConfigError,
    DatabaseSection,
    RunConfig,
    TrackingSection,
    load_run_config,
    parse_run_config,
    resolve_for_deployment,
)
from fedmoe.coordinator.round.flower_run import DATABASE_ENV, FlowerRun
from fedmoe.coordinator.round.strategy import FederatedLoRA
from fedmoe.coordinator.round.tracking import (
    RunFeed,
    Trackers,
    flatten,
    open_trackers,
    round_metrics,
    tracked_config,
)
from fedmoe.coordinator.store.db import ParticipationRecord, RoundRecord, RunStore, utcnow
from fedmoe.model.corpus import DEMO_DATA_DIR

PLAN = {"secure_aggregation": False, "record": {"epsilon": 8.0, "delta": 1e-5}}


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    """The trackers set MLflow's environment defaults in their process; not in the suite's
    (set, then deleted: monkeypatch restores only what it has seen)."""
    for name in (
        "MLFLOW_ALLOW_FILE_STORE",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    ):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _tracking(tmp_path: Path) -> TrackingSection:
    return TrackingSection(
        mlflow_uri=(tmp_path / "mlruns").as_uri(), tensorboard_dir=str(tmp_path / "tb")
    )


def _round(number: int, status: str = "completed", checkpoint: Path | None = None) -> RoundRecord:
    started = utcnow()
    ok = status == "completed"
    participations = [
        ParticipationRecord(
            node_id=str(10 + i),
            status="ok" if ok else "failed",
            enterprise=name,
            epsilon_record=0.5 * number + i,
            eval_loss=1.0 / number + i if ok else None,
            error=None if ok else "no reply",
        )
        for i, name in enumerate(("acme", "globex"))
    ]
    return RoundRecord(
        number=number,
        started_at=started,
        ended_at=started + dt.timedelta(seconds=1.5 * number),
        status=status,
        bytes_up=1000 * number,
        bytes_down=2000 * number,
        train_loss=2.0 / number if ok else None,
        eval_loss=1.5 / number if ok else None,
        server_eval_loss=1.2 / number if ok else None,
        update_norm=0.1 * number if ok else None,
        checkpoint_path=str(checkpoint) if checkpoint else None,
        checkpoint_sha256="0" * 64 if checkpoint else None,
        participations=participations,
    )


def _adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text("{}")
    return folder


def _store_with_run(tmp_path: Path, tracking: TrackingSection) -> tuple[RunStore, int]:
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    config = RunConfig(tracking=tracking).to_toml_dict()
    return store, store.create_run(config, 3, privacy_plan=PLAN)


def _mlflow(uri: str):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # restored by _mlflow_env
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fedmoe")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def _tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _text(events, tag: str) -> str:
    # The latest: a resumed run logs its (same) config again.
    return events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def _expected(store: RunStore, run_id: int) -> dict[str, list[tuple[int, float]]]:
    """Every metric's (step, value) series, as the run database has it."""
    series: dict[str, list[tuple[int, float]]] = {}
    failed = 0
    for row in store.rounds(run_id):
        failed += row.status == "failed"
        for key, value in round_metrics(row, failed).items():
            series.setdefault(key, []).append((row.number, value))
    return series


def _check_backends(tracking: TrackingSection, store: RunStore, run_id: int):
    """MLflow's and TensorBoard's series equal the database's; returns the MLflow client and run."""
    expected = _expected(store, run_id)
    client, run = _mlflow(tracking.mlflow_uri)
    assert run.data.tags["fedmoe.run_id"] == str(run_id)
    assert run.data.tags["fedmoe.run_uid"] == store.run(run_id).uid
    assert set(run.data.metrics) == set(expected)
    for key, values in expected.items():
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == values, key
    events = _tensorboard(Path(tracking.tensorboard_dir) / f"run-{run_id:04d}")
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, values in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in values], key
        assert [v for _, v in got] == pytest.approx([v for _, v in values], rel=1e-6), key
    config = store.run(run_id).config
    block = _text(events, "config").removeprefix("```json\n").removesuffix("\n```")
    assert json.loads(block) == tracked_config(config)
    assert run.data.params == flatten(tracked_config(config))
    return client, run


def test_a_run_database_is_streamed_to_mlflow_and_tensorboard(tmp_path):
    tracking = _tracking(tmp_path)
    store, run_id = _store_with_run(tmp_path, tracking)
    feed = RunFeed(open_trackers(tracking, run_id, store.run(run_id).uid), store, store.run(run_id))
    store.record_round(run_id, _round(1, checkpoint=_adapter(tmp_path / "round-001")))
    feed.rounds()
    store.record_round(run_id, _round(2, status="failed"))
    store.record_round(run_id, _round(3, checkpoint=_adapter(tmp_path / "round-003")))
    feed.result("result: round 3")
    feed.close()

    client, run = _check_backends(tracking, store, run_id)
    expected = _expected(store, run_id)
    assert expected["failed_rounds"] == [(1, 0.0), (2, 1.0), (3, 1.0)]
    assert expected["epsilon_record/globex"] == [(1, 1.5), (2, 2.0), (3, 2.5)]
    assert expected["heldout_loss/acme"] == [(1, 1.0), (3, 1.0 / 3)]
    assert expected["participants"] == [(1, 2.0), (2, 0.0), (3, 2.0)]
    assert expected["duration_s"][1][1] >= 3.0
    assert "database.url" not in run.data.params and "lora.r" in run.data.params
    assert run.data.params["federation.rounds"] == "3"
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert artifacts == {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"}
    result = client.download_artifacts(run.info.run_id, "result.json", str(tmp_path))
    assert json.loads(Path(result).read_text()) == {"result_round": 3, "summary": "result: round 3"}
    plan = client.download_artifacts(run.info.run_id, "privacy_plan.json", str(tmp_path))
    assert json.loads(Path(plan).read_text()) == PLAN
    events = _tensorboard(Path(tracking.tensorboard_dir) / f"run-{run_id:04d}")
    assert '"result_round": 3' in _text(events, "result")
    assert str(tmp_path / "round-003") in _text(events, "result")


def test_a_resumed_run_goes_on_in_the_same_mlflow_run_from_where_it_resumes(tmp_path):
    tracking = _tracking(tmp_path)
    store, run_id = _store_with_run(tmp_path, tracking)
    uid = store.run(run_id).uid
    feed = RunFeed(open_trackers(tracking, run_id, uid), store, store.run(run_id))
    store.record_round(run_id, _round(1, checkpoint=_adapter(tmp_path / "round-001")))
    feed.rounds()
    feed.close()
    # The next attempt: round 1 is not logged twice, round 2 lands in the same MLflow run.
    feed = RunFeed(open_trackers(tracking, run_id, uid), store, store.run(run_id))
    store.record_round(run_id, _round(2, checkpoint=_adapter(tmp_path / "round-002")))
    feed.rounds()
    feed.close()
    _check_backends(tracking, store, run_id)


class _Recording:
    name = "Recording"

    def __init__(self):
        self.rounds = []

    def log_run(self, config, privacy_plan): ...

    def log_round(self, number, metrics):
        self.rounds.append(number)

    def log_final(self, adapter_dir, result): ...

    def close(self): ...


def test_a_tracker_that_fails_is_named_once_and_the_others_go_on(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    tracking = _tracking(tmp_path)
    store, run_id = _store_with_run(tmp_path, tracking)
    trackers = open_trackers(tracking, run_id, store.run(run_id).uid)
    recording = _Recording()
    trackers.trackers.append(recording)
    feed = RunFeed(trackers, store, store.run(run_id))
    monkeypatch.setattr(MlflowClient, "log_batch", full)
    for number in (1, 2):
        store.record_round(run_id, _round(number, checkpoint=_adapter(tmp_path / f"r{number}")))
        feed.rounds()
    feed.result("done")
    feed.close()
    warnings = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
    assert warnings == [
        "[fedmoe] WARNING: the MLflow tracker failed and is no longer used; the run goes on "
        "(OSError: [Errno 28] No space left on device)"
    ]
    assert recording.rounds == [1, 2]
    events = _tensorboard(Path(tracking.tensorboard_dir) / f"run-{run_id:04d}")
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]


def test_trackers_that_cannot_start_or_read_the_database_stop_with_a_warning(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (tmp_path / "file").write_text("")
    down = TrackingSection(
        mlflow_uri="http://127.0.0.1:9", tensorboard_dir=str(tmp_path / "file" / "tb")
    )
    started = time.monotonic()
    assert not open_trackers(down, 1, "0" * 32)
    assert time.monotonic() - started < 30
    out = capsys.readouterr().out
    assert "WARNING: the MLflow tracker failed" in out
    assert "WARNING: the TensorBoard tracker failed" in out

    def gone(run_id, after=0):
        raise ConnectionError("database gone")

    store, run_id = _store_with_run(tmp_path, _tracking(tmp_path))
    recording = _Recording()
    feed = RunFeed(Trackers([recording]), store, store.run(run_id))
    monkeypatch.setattr(store, "rounds", gone)
    feed.rounds()
    assert not feed.trackers and recording.rounds == []
    assert "WARNING: the trackers stop; the run goes on" in capsys.readouterr().out


# --- the config --------------------------------------------------------------------------------


def test_tracking_paths_resolve_against_the_config_folder(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = folder / "run.toml"
    path.write_text("[tracking]\nmlflow_uri = 'mlruns'\ntensorboard_dir = 'tb'\n")
    tracking = load_run_config(path).tracking
    assert tracking.mlflow_uri == (folder / "mlruns").as_uri()
    assert tracking.tensorboard_dir == str(folder / "tb")
    assert tracking.mlflow_experiment == "fedmoe"
    path.write_text("[tracking]\nmlflow_uri = 'file:store/ml'\nmlflow_experiment = 'lora-v2'\n")
    tracking = load_run_config(path).tracking
    assert tracking.mlflow_uri == (folder / "store" / "ml").as_uri()
    assert tracking.mlflow_folder == folder / "store" / "ml"
    assert tracking.mlflow_experiment == "lora-v2" and tracking.tensorboard_dir is None
    server = "https://mlflow.example.com:5000"
    tracking = load_run_config(path, {"tracking.mlflow_uri": server}).tracking
    assert tracking.mlflow_uri == server and tracking.mlflow_folder is None
    assert not list(folder.glob("*/"))  # checked, not made


@pytest.mark.parametrize(
    "text, message",
    [
        ("mlflow_uri = 'sqlite:///ml.db'", "tracking.mlflow_uri: URIs of scheme 'sqlite'"),
        ("mlflow_uri = 'http://'", "tracking.mlflow_uri: an http(s) URI needs a host"),
        ("mlflow_uri = 'file://elsewhere/ml'", "tracking.mlflow_uri: a file: URI names a folder"),
        ("mlflow_uri = ''", "tracking.mlflow_uri: String should have at least 1 character"),
        ("mlflow_experiment = 'a b'", "tracking.mlflow_experiment: String should match"),
        ("tensorboard_dir = 'run.toml'", "tracking.tensorboard_dir: "),
        ("tensorboard_dir = '/proc/tb'", "tracking.tensorboard_dir: /proc/tb is a system folder"),
        ("mlflow_uri = 'run.toml/ml'", "tracking.mlflow_uri: "),
        ("uri = 'x'", "tracking.uri: unknown key"),
    ],
)
def test_a_bad_tracking_section_is_refused_naming_the_field(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(f"[tracking]\n{text}\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert message in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["run.toml"]


@pytest.mark.parametrize(
    "key, missing", [("mlflow_uri", "mlflow"), ("tensorboard_dir", "tensorboard")]
)
def test_a_tracker_whose_package_is_missing_is_refused_by_run_and_plan(
    tmp_path, monkeypatch, capsys, key, missing
):
    from fedmoe.cli.main import main

    monkeypatch.setattr(config_module, "_installed", lambda module: module != missing)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text(f"[tracking]\n{key} = 'trackers'\n")
    for command in ("run", "plan"):
        assert main([command, "--config", "run.toml"]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert f"tracking.{key}: " in out and "pip install 'fedmoe[tracking]'" in out, out
    assert [p.name for p in tmp_path.iterdir()] == ["run.toml"]  # nothing started


def test_the_flower_run_config_nodes_receive_carries_no_database_url(monkeypatch):
    """Every SuperNode receives the Flower run config: the run database's URL (a PostgreSQL one
    may carry a password) reaches the ServerApp through its environment only."""
    url = "postgresql+psycopg://fedmoe:s3cret-pw@db.internal:5432/runs"
    config = load_run_config(None).model_copy(update={"database": DatabaseSection(url=url)})
    flower = FlowerRun(1, config, url, "deployment").to_run_config()
    assert "s3cret-pw" not in json.dumps(flower) and "db.internal" not in json.dumps(flower)
    monkeypatch.delenv(DATABASE_ENV, raising=False)
    with pytest.raises(ValueError, match=DATABASE_ENV):
        FlowerRun.from_run_config(flower)
    monkeypatch.setenv(DATABASE_ENV, url)
    assert FlowerRun.from_run_config(flower).database_url == url


def test_tracking_stays_with_the_coordinator_and_out_of_the_privacy_identity(tmp_path, monkeypatch):
    tracking = _tracking(tmp_path)
    config = load_run_config(
        None, {"tracking.mlflow_uri": tracking.mlflow_uri, "tracking.tensorboard_dir": "tb"}
    )
    assert config.tracking.tensorboard_dir == str(Path.cwd() / "tb")
    # The run row keeps it (the ServerApp reads it there) ...
    assert parse_run_config(config.to_toml_dict()).tracking == config.tracking
    # ... the Flower run's config, which reaches every deployed node, does not.
    flower = FlowerRun(1, config, "sqlite://", "deployment").to_run_config()
    assert "tracking" not in json.loads(flower["run-config"])
    assert "mlruns" not in json.dumps(flower)
    monkeypatch.setenv(DATABASE_ENV, "sqlite://")
    assert FlowerRun.from_run_config(flower).config == config.model_copy(
        update=dict(tracking=TrackingSection(), database=DatabaseSection())
    )
    # Each round's spec, and with it the nodes' ledger key, is the same with or without it.
    ctx = SimpleNamespace(run_uid="a" * 32, base_fingerprint="b" * 64, adapter_layout="c" * 16)
    specs = [
        FederatedLoRA.round_spec(SimpleNamespace(config=c, ctx=ctx, run_id=1), 1)
        for c in (config, load_run_config(None))
    ]
    assert specs[0].to_config() == specs[1].to_config()
    assert specs[0].ledger_key() == specs[1].ledger_key()


def test_a_deployment_run_takes_absolute_tracking_paths_only(tmp_path):
    relative = parse_run_config({"tracking": {"tensorboard_dir": "tb"}})
    with pytest.raises(ConfigError, match="tracking.tensorboard_dir: use an absolute path"):
        resolve_for_deployment(relative, ["acme"], "sqlite://", str(tmp_path))
    absolute = parse_run_config({"tracking": {"mlflow_uri": str(tmp_path / "ml")}})
    resolved = resolve_for_deployment(absolute, ["acme"], "sqlite://", str(tmp_path))
    assert resolved.tracking.mlflow_uri == (tmp_path / "ml").as_uri()


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_fedmoe_run_streams_its_rounds_to_mlflow_and_tensorboard(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'runs.db'}"
    (tmp_path / "run.toml").write_text(
        f"""
[federation]
rounds = 2
[train]
local_steps = 2
[lora]
r = 4
alpha = 8
[database]
url = "{db_url}"
[output]
dir = "out"
[tracking]
mlflow_uri = "mlruns"
tensorboard_dir = "tb"
[[federation.enterprises]]  # one: the fewest processes, on a machine of 2 cores
name = "finance"
data = "{DEMO_DATA_DIR / "finance"}"
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "run", "--config", "run.toml"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "WARNING: the" not in result.stdout, result.stdout[-3000:]
    store = RunStore(db_url)
    (run,) = store.runs()
    rows = store.rounds(run.id)
    assert [(r.number, r.status) for r in rows] == [(1, "completed"), (2, "completed")]
    tracking = parse_run_config(run.config).tracking
    assert tracking.mlflow_uri == (tmp_path / "mlruns").as_uri()
    client, mlflow_run = _check_backends(tracking, store, run.id)
    assert {"train_loss", "server_eval_loss", "federated_eval_loss", "bytes_up"} <= set(
        mlflow_run.data.metrics
    )
    assert "heldout_loss/finance" in mlflow_run.data.metrics
    assert mlflow_run.data.params["federation.enterprises.0.name"] == "finance"
    assert mlflow_run.info.status == "FINISHED"
    adapter = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter

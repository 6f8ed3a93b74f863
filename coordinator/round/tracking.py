"""Experiment trackers: a run's config, privacy plan, per-round metrics and result, streamed to
MLflow and/or TensorBoard (`[tracking]` in the run config).

Everything comes from the run database, after the fact: a round is logged once it is recorded,
so a tracker shows what `fedmoe rounds` shows, and nodes send nothing more for it. A tracker is a
view of the run, never part of it: one that fails (server down, disk full) is named in one
WARNING line and dropped, and the run goes on. A resumed run logs into the same MLflow run and
TensorBoard folder, from the round it resumes at.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from fedmoe.coordinator.config import TrackingSection
from fedmoe.coordinator.store.artifacts import resolve_adapter
from fedmoe.coordinator.store.db import Round, Run, RunStore

T = TypeVar("T")


class Tracker(Protocol):
    name: str

    def log_run(self, config: dict, privacy_plan: dict | None) -> None: ...

    def log_round(self, number: int, metrics: dict[str, float]) -> None: ...

    def log_final(self, adapter_dir: Path | None, result: dict) -> None: ...

    def close(self) -> None: ...


def _warn(name: str, err: BaseException) -> None:
    text = (str(err).strip().splitlines() or [""])[0][:300]
    print(
        f"[fedmoe] WARNING: the {name} tracker failed and is no longer used; the run goes on "
        f"({type(err).__name__}: {text})",
        flush=True,
    )


class Trackers:
    """Each call goes to every tracker still in use; one that raises is warned about and dropped."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_run(self, config: dict, privacy_plan: dict | None) -> None:
        self._each(lambda t: t.log_run(config, privacy_plan))

    def log_round(self, number: int, metrics: dict[str, float]) -> None:
        self._each(lambda t: t.log_round(number, metrics))

    def log_final(self, adapter_dir: Path | None, result: dict) -> None:
        self._each(lambda t: t.log_final(adapter_dir, result))

    def close(self) -> None:
        self._each(lambda t: t.close())
        self.trackers = []

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as err:  # noqa: BLE001 - any failure of a tracker: it is dropped
                self.trackers.remove(tracker)
                _warn(tracker.name, err)


def open_trackers(tracking: TrackingSection, run_id: int, run_uid: str) -> Trackers:
    """The run's trackers; one that cannot start is warned about and left out."""
    opened: list[Tracker] = []
    for name, wanted, kind in (
        ("MLflow", tracking.mlflow_uri, MlflowTracker),
        ("TensorBoard", tracking.tensorboard_dir, TensorBoardTracker),
    ):
        if wanted is None:
            continue
        try:
            opened.append(kind(tracking, run_id, run_uid))
        except Exception as err:  # noqa: BLE001 - as in Trackers._each
            _warn(name, err)
    return Trackers(opened)


class MlflowTracker:
    """One MLflow run per fedmoe run: params (the flattened config), a metric per round
    (step = the round number), the privacy plan and the result as JSON, the adapter as artifacts."""

    name = "MLflow"

    def __init__(self, tracking: TrackingSection, run_id: int, run_uid: str):
        if tracking.mlflow_folder is not None:
            # MLflow 3 keeps its file store in maintenance mode, behind this opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        else:
            # MLflow's own defaults retry a server that is down for minutes, a stall of the run.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking.mlflow_uri)
        experiment = self.client.get_experiment_by_name(tracking.mlflow_experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self.client.create_experiment(tracking.mlflow_experiment)
        )
        # A resumed run goes on in its MLflow run, found by the run's uid: run ids repeat
        # across run databases, uids do not.
        found = self.client.search_runs(
            [experiment_id], f"tags.`fedmoe.run_uid` = '{run_uid}'", max_results=1
        )
        tags = {"fedmoe.run_id": str(run_id), "fedmoe.run_uid": run_uid}
        self.run = (
            found[0].info.run_id
            if found
            else self.client.create_run(
                experiment_id, tags=tags, run_name=f"run-{run_id:04d}"
            ).info.run_id
        )

    def log_run(self, config: dict, privacy_plan: dict | None) -> None:
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in flatten(config).items()]
        self.client.log_batch(self.run, params=params)
        self.client.log_dict(self.run, privacy_plan or {}, "privacy_plan.json")

    def log_round(self, number: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, number) for key, value in metrics.items()]
        self.client.log_batch(self.run, metrics=batch)

    def log_final(self, adapter_dir: Path | None, result: dict) -> None:
        if adapter_dir is not None:
            self.client.log_artifacts(self.run, str(adapter_dir), "adapter")
        self.client.log_dict(self.run, result, "result.json")
        self.client.set_terminated(self.run, "FINISHED")

    def close(self) -> None:
        """Nothing is held open: every call went out whole."""


class TensorBoardTracker:
    """`tensorboard_dir/run-NNNN`: a scalar per metric and round (global_step = the round
    number), the config, the privacy plan and the result as text."""

    name = "TensorBoard"

    def __init__(self, tracking: TrackingSection, run_id: int, run_uid: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(tracking.tensorboard_dir) / f"run-{run_id:04d}"))

    def log_run(self, config: dict, privacy_plan: dict | None) -> None:
        self.writer.add_text("config", _json_block(config))
        self.writer.add_text("privacy_plan", _json_block(privacy_plan or {}))
        self.writer.flush()

    def log_round(self, number: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=number)
        self.writer.flush()

    def log_final(self, adapter_dir: Path | None, result: dict) -> None:
        adapter = str(adapter_dir) if adapter_dir else None
        self.writer.add_text("result", _json_block({**result, "adapter": adapter}))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _json_block(value: dict) -> str:
    """JSON as a code block of TensorBoard's (markdown) text view."""
    return "```json\n" + json.dumps(value, indent=2, sort_keys=True) + "\n```"


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """`section.key` -> the value as text; a list of tables by index (`federation.enterprises.0.name`)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def tracked_config(config: dict) -> dict:
    """What a tracker is told of a run's config: not where the run is recorded and tracked,
    which is not what it trains, and whose URLs may carry a password."""
    return {key: value for key, value in config.items() if key not in ("database", "tracking")}


def round_metrics(row: Round, failed_rounds: int) -> dict[str, float]:
    """A recorded round as the run database has it (None values left out); `failed_rounds`: the
    run's failed rounds up to this one. Epsilons are each enterprise's spend of the run so far."""
    metrics = {
        "train_loss": row.train_loss,
        "server_eval_loss": row.server_eval_loss,
        "federated_eval_loss": row.eval_loss,
        "update_norm": row.update_norm,
        "participants": row.participants,
        "failures": row.failures,
        "failed_rounds": failed_rounds,
        "duration_s": (row.ended_at - row.started_at).total_seconds(),
        "bytes_up": row.bytes_up,
        "bytes_down": row.bytes_down,
    }
    for p in row.participations:
        who = p.enterprise or f"node-{p.node_id}"
        metrics[f"heldout_loss/{who}"] = p.eval_loss
        metrics[f"epsilon_record/{who}"] = p.epsilon_record
        metrics[f"epsilon_enterprise/{who}"] = p.epsilon_enterprise
    return {key: float(value) for key, value in metrics.items() if value is not None}


class RunFeed:
    """The run database as the trackers see it: the config and privacy plan when the run (re)starts,
    each round row once and in order after it is recorded (a failed round with the next round
    that commits, or when the run ends), and the result when the run completes. Nothing here
    fails the run: a database read that fails stops the trackers, with a warning."""

    def __init__(self, trackers: Trackers, store: RunStore, run: Run):
        self.trackers, self.store, self.run_id = trackers, store, run.id
        self.logged = self.failed = 0
        if trackers:
            earlier = self._read(lambda: store.rounds(run.id)) or []
            self.logged = max((r.number for r in earlier), default=0)
            self.failed = sum(r.status == "failed" for r in earlier)
            self.trackers.log_run(tracked_config(run.config), run.privacy_plan)

    def rounds(self) -> None:
        """Log the rounds recorded since the last call."""
        if not self.trackers:
            return
        for row in self._read(lambda: self.store.rounds(self.run_id, after=self.logged)) or []:
            self.failed += row.status == "failed"
            self.trackers.log_round(row.number, round_metrics(row, self.failed))
            self.logged = row.number

    def evaluation(self, number: int) -> None:
        """A logged round's federated evaluation, which arrived with the next round: its loss and
        each enterprise's held-out loss."""
        if not self.trackers or number > self.logged:
            return
        rows = self._read(lambda: self.store.rounds(self.run_id, after=number - 1)) or []
        for row in rows[:1]:
            metrics = round_metrics(row, self.failed)
            self.trackers.log_round(
                number,
                {
                    k: v
                    for k, v in metrics.items()
                    if k == "federated_eval_loss" or k.startswith("heldout_loss/")
                },
            )

    def result(self, summary: str) -> None:
        """A completed run: its last rounds, and its result's adapter (as `fedmoe export` takes it;
        none when the base model is the result)."""
        self.rounds()
        if (
            not self.trackers
            or (found := self._read(lambda: resolve_adapter(self.store, self.run_id))) is None
        ):
            return
        row = found[0]
        self.trackers.log_final(
            Path(row.checkpoint_path) if row else None,
            {"result_round": row.number if row else None, "summary": summary},
        )

    def close(self) -> None:
        self.rounds()
        self.trackers.close()

    def _read(self, read: Callable[[], T]) -> T | None:
        try:
            return read()
        except Exception as err:  # noqa: BLE001 - the run handles its database; the trackers stop
            print(
                "[fedmoe] WARNING: the trackers stop; the run goes on (reading the run database "
                f"for them failed: {type(err).__name__}: {str(err)[:300]})",
                flush=True,
            )
            self.trackers.close()
            return None

"""`fedmoe run`: one run on Flower's simulation engine, on a SuperLink of our own on loopback.

The run row is written first (so that a failure to start is recorded too); then the run goes
through the same `RunSupervisor` as on the coordinator service: its outcome is read from Flower's
run status and our database, never from the end of a log stream, and a ServerApp that dies
mid-run is resumed from the last committed round. Ctrl-C or SIGTERM stops the run (`stopped`),
and every process this launcher started ends with it; `fedmoe run --resume RUN_ID` continues a
run whose launcher was killed.
"""

from __future__ import annotations

import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedmoe.coordinator.config import ConfigError, RunConfig, parse_run_config
from fedmoe.coordinator.round.flower_run import DATABASE_ENV, LOG_END
from fedmoe.coordinator.service.runs import RunSupervisor
from fedmoe.coordinator.service.superlink import FINISHED, SuperLink, follow_logs
from fedmoe.coordinator.store.db import FINAL_STATUSES, RunStore
from fedmoe.coordinator.store.outcome import outcome
from fedmoe.coordinator.store.run_folders import check_output_dir
from fedmoe.coordinator.store.views import privacy_plan_summary
from fedmoe.support.files import MIN_FREE_BYTES, unwritable
from fedmoe.support.processes import Stopped, stop_on_signals
from fedmoe.support.words import plural

POLL_S = 1.0


def federation_config(config: RunConfig) -> str:
    fed = config.federation
    resources = (
        f"num-supernodes={len(fed.enterprises)} client-resources-num-cpus={fed.cpus_per_client}"
    )
    if fed.gpus_per_client:
        resources += f" client-resources-num-gpus={fed.gpus_per_client:g}"
    return resources


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_writable(directory: Path) -> None:
    """Fail before anything starts if checkpoints could not be written."""
    if (problem := unwritable(directory, MIN_FREE_BYTES)) is not None:
        raise ConfigError(f"output.dir: {problem}")


def _follow(superlink: SuperLink, flower_run_id: str, on_text) -> threading.Thread:
    """Print a Flower run's log until Flower says the run finished."""
    control = superlink.control()

    def done() -> bool:
        return not superlink.alive() or control.run_status(flower_run_id)[0] == FINISHED

    thread = threading.Thread(
        target=follow_logs,
        args=(control, flower_run_id, on_text, done),
        name=flower_run_id,
        daemon=True,
    )
    thread.start()
    return thread


# A ServerApp's progress line for round N (coordinator/round/server_app.py's format_round).
ROUND_LINE = re.compile(r"\[fedmoe\] round (\d+)/")


def _print_from_database(
    store: RunStore, run_id: int, config: RunConfig, printed: set[int]
) -> None:
    """Under load Flower can lose a ServerApp's last log lines for good: print what they said
    (the rounds not shown, how the run ended) from the run database instead."""
    from fedmoe.coordinator.round.server_app import format_round

    print("[fedmoe] (Flower's log lost the run's last lines; from the run database:)", flush=True)
    run = store.run(run_id)
    for record in store.rounds(run_id):
        if record.number not in printed and record.status == "completed":
            print(format_round(record, config, run.base_eval_loss), flush=True)
    ended = f"[fedmoe] run {run_id} {run.status}" + (f": {run.error}" if run.error else "")
    if run.status == "budget_spent":  # as the ServerApp says it
        ended = f"[fedmoe] run {run_id} stopped: privacy budgets are spent ({run.error})"
    print(ended, flush=True)
    if run.status == "completed" and (result := outcome(store.rounds(run_id), run.base_eval_loss)):
        print(f"[fedmoe] run {run_id} {result.describe()}", flush=True)


def launch(
    config: RunConfig | None,
    verbose: bool = False,
    resume: int | None = None,
    database: str | None = None,
) -> int:
    """Run `config` (or resume run `resume` of `database`) on the simulation engine; returns a
    process exit code (0: the run completed or ended because budgets are spent)."""
    store = RunStore(database or config.database.url)
    if resume is not None:
        run = store.run(resume)
        if run is None:
            raise LookupError(f"run {resume} not found; `fedmoe runs` lists the runs")
        if run.status in FINAL_STATUSES or run.engine != "simulation":
            raise ConfigError(
                f"run {resume} is {run.status} on the {run.engine} engine: only a simulation run left running can be resumed"
            )
        config, run_id = parse_run_config(run.config, f"run {resume}"), resume
    else:
        check_writable(Path(config.output.dir))
        check_output_dir(config.output.dir, {r.id: r.uid for r in store.runs()})
        names = [e.name for e in config.federation.enterprises]
        run_id = store.create_run(
            config.to_toml_dict(),
            config.federation.rounds,
            "simulation",
            names,
            privacy_plan=privacy_plan_summary(config),
        )
    check_writable(Path(config.output.dir))
    flower_root = Path(config.output.dir) / "flower"
    flower_root.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=flower_root))
    n, rounds = len(config.federation.enterprises), config.federation.rounds
    print(
        f"[fedmoe] run {run_id} on Flower's simulation engine: {plural(n, 'enterprise')}, "
        f"{plural(rounds, 'round')} (logs in {home})",
        flush=True,
    )
    if not config.federation.gpus_per_client and _cuda_available():
        print(
            "[fedmoe] WARNING: this machine has a GPU, but the clients train on the CPU: "
            "set federation.gpus_per_client (e.g. 0.25 to share one GPU among four clients)",
            flush=True,
        )
    printed_rounds: set[int] = set()
    log_ended = threading.Event()

    def on_text(text: str) -> None:
        with open(home / "run.log", "a") as log:
            log.write(text)
        for line in text.splitlines(keepends=True):
            if LOG_END in line:
                log_ended.set()
            if (round_line := ROUND_LINE.search(line)) is not None:
                printed_rounds.add(int(round_line.group(1)))
            if verbose:
                print(line, end="", flush=True)
            elif "[fedmoe]" in line:
                print(line[line.find("[fedmoe]") :], end="", flush=True)

    link = SuperLink(home, simulation=True, env={DATABASE_ENV: config.database.url})
    with stop_on_signals(), link as superlink:
        supervisor = RunSupervisor(
            store, superlink, "simulation", config.database.url, max_resumes=2,
            federation_config=federation_config(config),
        )  # fmt: skip
        follower: threading.Thread | None = None
        try:
            while True:
                run = supervisor.check(run_id)
                if run.flower_run_id and (follower is None or follower.name != run.flower_run_id):
                    follower = _follow(superlink, run.flower_run_id, on_text)
                if run.status in FINAL_STATUSES:
                    break
                time.sleep(POLL_S)
            # Its stream ends once Flower has delivered the last lines.
            follower.join(timeout=30)
            if not log_ended.is_set():
                _print_from_database(store, run_id, config, printed_rounds)
        except Stopped as signal_name:
            supervisor.stop(run_id, f"interrupted ({signal_name}) while running")
            print(
                f"[fedmoe] run {run_id} stopped ({signal_name}); resume it with `fedmoe run --resume {run_id}`",
                flush=True,
            )
            return 130
    run = store.run(run_id)
    db = config.database.url
    if run.status == "completed":
        print(
            f"[fedmoe] next: `fedmoe rounds {run_id} --clients --database {db}`, "
            f"`fedmoe generate --run {run_id} --database {db} --prompt TEXT`",
            flush=True,
        )
        return 0
    if run.status == "budget_spent":
        return 0
    # One line: what failed and where the details are (Flower's tracebacks stay in the log).
    print(
        f"error: run {run_id} {run.status}: {run.error}; full log: {home / 'run.log'}",
        file=sys.stderr,
    )
    return 1

"""Carrying a fedmoe run on a SuperLink until it ends, across ServerApp and coordinator restarts.

A fedmoe run is carried by one Flower run at a time. The ServerApp writes the run's final status
itself on every way out but one: when it is killed (or the SuperLink under it, or the database
went away), its Flower run ends with our row still `running`. The supervisor is the one who
notices, from Flower's status, never from a log stream ending, and then resumes the run from its
last committed round in a new Flower run (at most `max_resumes` times) or marks it `failed` with
the reason. A run whose Flower run was started by an earlier SuperLink (this coordinator was
restarted) is resumed the same way.
"""

from __future__ import annotations

import logging
import time

from fedmoe.coordinator.config import RunConfig, parse_run_config
from fedmoe.coordinator.round.flower_run import FlowerRun
from fedmoe.coordinator.service.superlink import FINISHED, SuperLink, submit_run
from fedmoe.coordinator.store.db import FINAL_STATUSES, Run, RunStore

log = logging.getLogger("fedmoe.runs")


class RunSupervisor:
    def __init__(
        self,
        store: RunStore,
        superlink: SuperLink,
        engine: str,
        database_url: str,
        max_resumes: int = 3,
        federation_config: str | None = None,
        reconnect_grace_s: float = 45.0,
    ):
        self.store = store
        self.superlink = superlink
        self.engine = engine
        self.database_url = database_url
        self.max_resumes = max_resumes
        self.federation_config = federation_config
        self.reconnect_grace_s = reconnect_grace_s
        self.submitted: set[str] = set()  # Flower runs this supervisor started on this SuperLink

    def config_of(self, run: Run) -> RunConfig:
        return parse_run_config(run.config, f"run {run.id}")

    def submit(self, run: Run, resume: bool) -> str:
        flower_run = FlowerRun(run.id, self.config_of(run), self.database_url, self.engine)
        flower_run_id = submit_run(self.superlink.home, flower_run, self.federation_config)
        self.submitted.add(flower_run_id)
        self.store.start_attempt(run.id, flower_run_id, resume=resume)
        what = f"resumed (attempt {run.resumes + 2})" if resume else "submitted"
        log.info("run %s %s as Flower run %s", run.id, what, flower_run_id)
        return flower_run_id

    def check(self, run_id: int) -> Run:
        """One supervision step for one run; returns the run as it now stands."""
        run = self.store.run(run_id)
        control = self.superlink.control()
        if run.status in FINAL_STATUSES:
            if (
                run.flower_run_id in self.submitted
                and control.run_status(run.flower_run_id)[0] != FINISHED
            ):
                control.stop_run(run.flower_run_id)  # e.g. stopped by an admin while queued
            return run
        if run.flower_run_id is None:
            if self._enterprises_back(run):
                self.submit(run, resume=False)
            return self.store.run(run_id)
        if run.flower_run_id not in self.submitted:
            # Started by an earlier SuperLink of ours: that Flower run can never finish.
            if not self._enterprises_back(run):
                return run
            control.stop_run(run.flower_run_id)
            status = (FINISHED, "stale", "its coordinator restarted")
        else:
            status = control.run_status(run.flower_run_id)
        if status[0] != FINISHED:
            if run.stop_requested:
                control.stop_run(run.flower_run_id)
            return run
        run = self.store.run(run_id)  # the ServerApp may have written its final status just now
        if run.status in FINAL_STATUSES:
            return run
        if run.stop_requested:
            self.store.finish_run(run_id, "stopped", "stopped by an admin")
        elif run.resumes < self.max_resumes:
            self.submit(run, resume=True)
        else:
            details = f"{status[1]}: {status[2]}".strip(": ")
            self.store.finish_run(
                run_id,
                "failed",
                f"the ServerApp ended without finishing the run ({details}); gave up after {run.resumes} resumes",
            )
        return self.store.run(run_id)

    def _enterprises_back(self, run: Run) -> bool:
        """Shortly after a SuperLink (re)start, submit a deployment run once its enterprises' nodes
        have been heard from again (or after a grace period): until then the SuperLink's state
        database still lists the ones it knew as online, and a round would fail on them at once."""
        if (
            self.engine != "deployment"
            or time.time() - self.superlink.started_at > self.reconnect_grace_s
        ):
            return True
        wanted = {
            int(n.flower_node_id)
            for n in self.store.nodes()
            if n.enterprise in (run.enterprises or [])
        }
        return wanted <= self.superlink.control().heard_from_since(self.superlink.started_at)

    def stop(self, run_id: int, reason: str) -> None:
        """Stop a run now: its Flower run is stopped and the run ends `stopped` with `reason`."""
        run = self.store.run(run_id)
        self.store.request_stop(run_id)
        if run.flower_run_id and run.flower_run_id in self.submitted:
            self.superlink.control().stop_run(run.flower_run_id)
        self.store.finish_run(run_id, "stopped", reason)

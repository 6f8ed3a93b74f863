"""Resuming a run: the node sends a re-sent round's release again (never a second one), the
coordinator resumes from a checkpoint it can trust, and the supervisor never leaves a run
`running` once Flower has stopped carrying it."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import round_config

from fedmoe.client.enterprise import EnterpriseNode, workspace
from fedmoe.client.ledger import ReplayRefused
from fedmoe.client.settings import NodeSettings
from fedmoe.contract.round import LocalTrainSettings, SecureSum
from fedmoe.coordinator.round.server_app import load_checkpoint, write_atomically
from fedmoe.coordinator.service.runs import RunSupervisor
from fedmoe.coordinator.store.db import RunStore
from fedmoe.model.base import load_base
from fedmoe.model.corpus import DEMO_DATA_DIR
from fedmoe.model.lora import attach_lora, get_adapter_vector, save_adapter, set_adapter_vector
from fedmoe.model.settings import LoraSettings

LORA = LoraSettings(r=4, alpha=8)
TRAIN = LocalTrainSettings(local_steps=2, batch_size=4, seq_len=32)
PRIVATE = {"record": {"epsilon": 8.0}, "enterprise": {"epsilon": 8.0, "clip": 0.05}}


@pytest.fixture
def node(tmp_path):
    settings = NodeSettings(
        enterprise="finance", data=DEMO_DATA_DIR / "finance", ledger=tmp_path / "ledger.sqlite"
    )
    ws = workspace(settings, LORA, TRAIN.seq_len)
    return EnterpriseNode(settings), ws


def _config(ws, server_round=1, **changes):
    return round_config(ws, PRIVATE, server_round, lora=LORA, train=TRAIN, **changes)


def test_a_resent_round_gets_the_same_release_and_no_second_charge(node):
    client, ws = node
    adapter = [get_adapter_vector(ws.model)]
    first = client.fit([a.copy() for a in adapter], _config(ws), secure_sum=None)
    entries = client.ledger.entries()
    again = client.fit([a.copy() for a in adapter], _config(ws), secure_sum=None)
    np.testing.assert_array_equal(first[0][0], again[0][0])  # the very same noise
    assert first[2] == again[2] and client.ledger.entries() == entries
    assert (
        client.budget(_config(ws))["epsilon_record"] == first[2]["epsilon_record"]
    )  # the handshake agrees


def test_a_resent_round_that_is_not_the_same_release_is_refused(node):
    client, ws = node
    adapter = get_adapter_vector(ws.model)
    session = SecureSum(2, 100.0, session="a" * 64, verified=True)
    client.fit([adapter.copy()], _config(ws, noise_shares=2), secure_sum=session)
    with pytest.raises(ReplayRefused, match="another global adapter"):
        client.fit([adapter + 1e-3], _config(ws, noise_shares=2), secure_sum=session)
    # A resumed coordinator opens a new SecAgg+ session: the release never goes into a second one
    # (its difference with the first sum would single this update out), nor into the clear.
    again = SecureSum(2, 100.0, session="b" * 64, verified=True)
    with pytest.raises(ReplayRefused, match="another secure-aggregation session"):
        client.fit([adapter.copy()], _config(ws, noise_shares=2), secure_sum=again)
    with pytest.raises(ReplayRefused, match="another secure-aggregation session"):
        client.fit([adapter.copy()], _config(ws), secure_sum=None)
    assert len(client.ledger.entries()) == 2  # round 1, both levels, charged once


def test_a_round_charged_but_cut_short_is_never_drawn_again(node, monkeypatch):
    client, ws = node
    adapter = get_adapter_vector(ws.model)
    monkeypatch.setattr(
        client.ledger, "released", lambda *a: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError):
        client.fit([adapter.copy()], _config(ws), secure_sum=None)
    monkeypatch.undo()
    entries = client.ledger.entries()
    with pytest.raises(ReplayRefused, match="one draw per charge"):
        client.fit([adapter.copy()], _config(ws), secure_sum=None)
    assert client.ledger.entries() == entries
    client.fit([adapter.copy()], _config(ws, server_round=2), secure_sum=None)  # the run goes on


def test_a_node_refuses_a_global_adapter_with_nan(node):
    client, ws = node
    adapter = get_adapter_vector(ws.model)
    adapter[3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        client.fit([adapter], _config(ws), secure_sum=None)
    assert client.ledger.entries() == []  # refused before anything was charged


def test_a_checkpoint_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "run-0001" / "round-001"

    def half_then_full_disk(staging: Path) -> None:
        (staging / "adapter_model.safetensors").write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(target, half_then_full_disk)
    assert not target.exists() and list(target.parent.iterdir()) == []
    write_atomically(target, lambda staging: (staging / "ok").write_text("1"))
    assert (target / "ok").read_text() == "1"


def test_a_resumed_run_refuses_a_changed_or_corrupt_checkpoint(tmp_path):
    from fedmoe.coordinator.round.server_app import directory_sha256

    model = attach_lora(load_base("embedded"), LORA)
    directory = tmp_path / "round-001"
    save_adapter(model, LORA, directory)
    digest = directory_sha256(directory)
    fresh = attach_lora(load_base("embedded"), LORA)
    load_checkpoint(fresh, directory, digest)
    np.testing.assert_array_equal(get_adapter_vector(fresh), get_adapter_vector(model))
    with pytest.raises(ValueError, match="changed since its round committed"):
        load_checkpoint(fresh, directory, "0" * 64)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(math.nan)
    save_adapter(model, LORA, directory)
    with pytest.raises(ValueError, match="NaN"):
        load_checkpoint(fresh, directory, directory_sha256(directory))


class _FakeLink:
    """The supervisor's view of a SuperLink: Flower run statuses we script."""

    def __init__(self):
        self.statuses: dict[str, tuple] = {}
        self.stopped: list[str] = []
        self.started_at = 0.0
        self.home = Path("/nonexistent")

    def control(self):
        return SimpleNamespace(
            run_status=lambda fid: self.statuses.get(fid, ("unknown", "", "")),
            stop_run=lambda fid: self.stopped.append(fid),
            heard_from_since=lambda moment: set(),
        )


@pytest.fixture
def supervised(tmp_path, monkeypatch):
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    link = _FakeLink()
    submitted = iter(f"fr{i}" for i in range(100))
    monkeypatch.setattr(
        "fedmoe.coordinator.service.runs.submit_run",
        lambda home, flower_run, federation=None: next(submitted),
    )
    from fedmoe.coordinator.config import load_run_config

    config = load_run_config(None, {"database.url": f"sqlite:///{tmp_path / 'runs.db'}"})
    run_id = store.create_run(config.to_toml_dict(), 3, "simulation", ["a"])
    return (
        RunSupervisor(store, link, "simulation", config.database.url, max_resumes=1),
        store,
        link,
        run_id,
    )


def test_a_flower_run_that_ends_with_the_run_unfinished_is_resumed_then_failed(supervised):
    supervisor, store, link, run_id = supervised
    assert supervisor.check(run_id).flower_run_id == "fr0"
    link.statuses["fr0"] = ("running", "", "")
    assert supervisor.check(run_id).status == "queued"  # Flower still runs it: nothing to decide
    link.statuses["fr0"] = ("finished", "failed", "ServerApp killed")
    run = supervisor.check(run_id)
    assert run.flower_run_id == "fr1" and run.resumes == 1 and run.status == "queued"
    link.statuses["fr1"] = ("finished", "failed", "killed again")
    run = supervisor.check(run_id)
    assert (
        run.status == "failed"
        and "gave up after 1 resumes" in run.error
        and "killed again" in run.error
    )


def test_a_run_whose_flower_run_belongs_to_an_earlier_superlink_is_resumed(supervised):
    supervisor, store, link, run_id = supervised
    supervisor.check(run_id)
    supervisor.submitted.clear()  # the coordinator restarted
    run = supervisor.check(run_id)
    assert link.stopped == ["fr0"] and run.flower_run_id == "fr1" and run.resumes == 1


def test_a_stopped_run_ends_stopped_and_its_flower_run_is_stopped(supervised):
    supervisor, store, link, run_id = supervised
    supervisor.check(run_id)
    supervisor.stop(run_id, "stopped by ops")
    run = store.run(run_id)
    assert run.status == "stopped" and run.error == "stopped by ops" and link.stopped == ["fr0"]
    assert not store.finish_run(run_id, "completed")  # a final status is final


def test_a_resume_falls_back_to_the_last_intact_checkpoint_and_says_so(tmp_path):
    from fedmoe.coordinator.round.server_app import directory_sha256, resume_from_intact

    model = attach_lora(load_base("embedded"), LORA)
    records, vectors = [], []
    for number in (1, 2, 3):
        vector = np.full_like(get_adapter_vector(model), 0.01 * number)
        set_adapter_vector(model, vector)
        directory = tmp_path / f"round-{number:03d}"
        save_adapter(model, LORA, directory)
        vectors.append(get_adapter_vector(model).copy())
        records.append(SimpleNamespace(number=number, checkpoint_path=str(directory),
                                       checkpoint_sha256=directory_sha256(directory)))  # fmt: skip
    fresh = attach_lora(load_base("embedded"), LORA)
    assert resume_from_intact(fresh, records) is None  # all intact: the latest, silently
    np.testing.assert_array_equal(get_adapter_vector(fresh), vectors[2])
    (tmp_path / "round-003" / "adapter_model.safetensors").write_bytes(b"truncated")
    fresh = attach_lora(load_base("embedded"), LORA)
    note = resume_from_intact(fresh, records)
    assert note.startswith("resumed from round 2's checkpoint; skipped round 3:")
    assert "changed since its round committed" in note
    np.testing.assert_array_equal(get_adapter_vector(fresh), vectors[1])
    for number in (1, 2):
        (tmp_path / f"round-{number:03d}" / "adapter_model.safetensors").unlink()
    fresh = attach_lora(load_base("embedded"), LORA)
    base = get_adapter_vector(fresh).copy()
    assert resume_from_intact(fresh, records).startswith("no intact checkpoint")
    np.testing.assert_array_equal(get_adapter_vector(fresh), base)


def test_a_runs_folder_is_its_own_and_never_another_runs(tmp_path):
    from fedmoe.coordinator.store.run_folders import (
        RUN_MARK,
        check_output_dir,
        claim_run_dir,
        folder_owner_problem,
    )
    from fedmoe.support.files import ConfigError

    folder = tmp_path / "run-0001"
    claim_run_dir(folder, "a" * 32, resumed=False)
    assert (folder / RUN_MARK).read_text().strip() == "a" * 32
    claim_run_dir(folder, "a" * 32, resumed=True)  # its own, again
    # Run 1 of another run database: refused before any node is asked, and before each round.
    with pytest.raises(ConfigError, match=r"output.dir: .* belongs to another run \(uid aaaaaaaa"):
        claim_run_dir(folder, "b" * 32, resumed=False)
    assert "belongs to another run" in folder_owner_problem(folder, "b" * 32)
    legacy = tmp_path / "run-0002"
    (legacy / "round-001").mkdir(parents=True)  # files without a mark: a new run refuses them
    with pytest.raises(ConfigError, match="holds another run's files"):
        claim_run_dir(legacy, "c" * 32, resumed=False)
    claim_run_dir(legacy, "c" * 32, resumed=True)  # a run resumed from before the mark adopts it
    assert folder_owner_problem(legacy, "c" * 32) is None
    # Before a run is created: the output folder holds only this database's runs.
    check_output_dir(tmp_path, {1: "a" * 32, 2: "c" * 32})
    (tmp_path / "run-0003" / "round-001").mkdir(parents=True)  # from before the mark
    check_output_dir(tmp_path, {1: "a" * 32, 2: "c" * 32, 3: "d" * 32})  # known by its number
    with pytest.raises(ConfigError, match=r"another run database \(run-0001, run-0002, run-0003\)"):
        check_output_dir(tmp_path, {})  # a new database beside the old folders

"""End to end: `fedmoe run` starts a real Flower SuperLink and the simulation engine, trains the
demo federation, records every round, and the result generates text and exports."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmoe.client.ledger import PrivacyLedger
from fedmoe.coordinator.store.db import RunStore

pytestmark = pytest.mark.e2e
FEDMOE = [sys.executable, "-m", "fedmoe.cli"]


def fedmoe(*args, cwd, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [*FEDMOE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _config(tmp_path, db_url, rounds=2, extra=""):
    path = tmp_path / "run.toml"
    path.write_text(
        f"""
[federation]
rounds = {rounds}
[train]
local_steps = 8
[lora]
r = 8
alpha = 16
[database]
url = "{db_url}"
[output]
dir = "out"
{extra}
"""
    )
    return path


def _check_run(db_url, rounds):
    store = RunStore(db_url)
    (run,) = store.runs()
    assert run.status == "completed" and run.base_fingerprint
    records = store.rounds(run.id)
    assert [r.number for r in records] == list(range(1, rounds + 1))
    assert all(r.status == "completed" and r.participants == 3 and r.failures == 0 for r in records)
    assert all(Path(r.checkpoint_path, "adapter_model.safetensors").is_file() for r in records)
    assert all(r.bytes_up > 0 and r.expert_load for r in records)
    assert all(r.updates_seen == 3 for r in records)  # no secure aggregation: one update per client
    before = {p.enterprise: p.heldout_loss_before for p in records[0].participations}
    after = {p.enterprise: p.eval_loss for p in records[-1].participations}
    assert set(before) == {"finance", "clinical", "manufacturing"}
    for name in before:
        assert after[name] < before[name], (
            f"{name}: held-out loss {before[name]:.4f} -> {after[name]:.4f}"
        )
    return run.id


def test_federated_fine_tune_on_sqlite_then_generate_and_export(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'runs.db'}"
    result = fedmoe("run", "--config", str(_config(tmp_path, db_url)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "round 2/2 | clients 3/3" in result.stdout
    run_id = _check_run(db_url, rounds=2)

    listed = fedmoe("rounds", str(run_id), "--clients", "--database", db_url, cwd=tmp_path)
    assert listed.returncode == 0 and "manufacturing" in listed.stdout

    gen = fedmoe(
        "generate",
        "--run",
        str(run_id),
        "--database",
        db_url,
        "--prompt",
        "QC log line 4",
        "--max-new-tokens",
        "12",
        cwd=tmp_path,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert len(gen.stdout.strip()) > len("QC log line 4")

    out = tmp_path / "merged"
    exp = fedmoe(
        "export",
        "--run",
        str(run_id),
        "--database",
        db_url,
        "--merge",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert exp.returncode == 0, exp.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v3"


def test_a_run_whose_clients_cannot_train_is_refused_before_it_starts(tmp_path):
    for i in range(2):
        (tmp_path / f"tiny{i}").mkdir()
        for split in ("train", "heldout"):
            (tmp_path / f"tiny{i}" / f"{split}.jsonl").write_text('{"text": "too short"}\n')
    enterprises = "\n".join(
        f'[[federation.enterprises]]\nname = "e{i}"\ndata = "tiny{i}"\n' for i in range(2)
    )
    db_url = f"sqlite:///{tmp_path / 'runs.db'}"
    result = fedmoe(
        "run", "--config", str(_config(tmp_path, db_url, rounds=1, extra=enterprises)), cwd=tmp_path
    )
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    for i in range(2):
        assert f"federation.enterprises.{i}.data: enterprise e{i}" in output
    assert "fewer than one block of train.seq_len=64" in output
    assert not (tmp_path / "runs.db").exists()  # no run row: nothing started


def test_bad_cli_input_is_refused_before_anything_starts(tmp_path):
    result = fedmoe(
        "run", "--set", "federation.rounds=0", "--set", "database.url=sqlite:///x.db", cwd=tmp_path
    )
    assert result.returncode == 2 and "federation.rounds" in result.stdout
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "runs").exists()
    result = fedmoe("rounds", "0", cwd=tmp_path)
    assert result.returncode == 2 and "must be >= 1" in result.stderr


def test_a_killed_launcher_takes_its_processes_along_and_the_run_resumes(tmp_path):
    """SIGKILL `fedmoe run` mid-run: Flower's SuperLink, SuperExec, ServerApp and simulation
    processes end with it, the run stays `running`, and `fedmoe run --resume` completes it with
    every round once, from the last intact checkpoint (the latest one is corrupted meanwhile)."""
    import psutil

    db_url = f"sqlite:///{tmp_path / 'runs.db'}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    config = (
        _config(tmp_path, db_url, rounds=3)
        .read_text()
        .replace("local_steps = 8", "local_steps = 3")
        .replace("rounds = 3", "rounds = 3\nmax_failed_rounds = 1")
    )
    (tmp_path / "run.toml").write_text(config)
    launcher = subprocess.Popen(
        [*FEDMOE, "run", "--config", "run.toml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    for line in launcher.stdout:
        if "round 2/3" in line:
            break
    # Kill once every node has charged round 3: its draw is under way (or just released).
    ledgers = tmp_path / "out" / "ledgers"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        charged = [
            any(r == 3 for _, r, *_ in PrivacyLedger(path).entries())
            for path in ledgers.glob("*.sqlite")
        ]
        if len(charged) == 3 and all(charged):
            break
        time.sleep(0.05)
    children = psutil.Process(launcher.pid).children(recursive=True)
    assert any("flower-superlink" in " ".join(c.cmdline()) for c in children)
    launcher.kill()
    launcher.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], [" ".join(p.cmdline())[:120] for p in alive]
    store = RunStore(db_url, migrate=False)
    assert store.runs()[0].status == "running"
    last = max(r.number for r in store.rounds(1) if r.status == "completed")
    (tmp_path / "out" / "run-0001" / f"round-{last:03d}" / "adapter_model.safetensors").write_bytes(
        b"cut short"
    )
    resumed = fedmoe("run", "--resume", "1", "--database", db_url, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed after round {last}" in resumed.stdout
    assert f"resumed from round {last - 1}'s checkpoint; skipped round {last}:" in resumed.stdout
    (run,) = store.runs()
    assert run.status == "completed" and run.resumes == 1
    assert [r.number for r in store.rounds(run.id)] == [1, 2, 3]
    # Round 3 again, from round 1's adapter: every node had drawn for it before the kill, so
    # every node refuses it (one draw per charge, one release per round): it is lost, recorded
    # as failed, and the run completes without counting it against max_failed_rounds.
    third = store.rounds(run.id)[2]
    assert third.status == "failed" and all(
        "one draw per charge" in p.error or "one release per round" in p.error
        for p in third.participations
    ), [(p.enterprise, p.error) for p in third.participations]
    assert "round 3 is lost" in resumed.stdout and "round 3" in (run.error or "")
    for ledger in (tmp_path / "out" / "ledgers").glob("*.sqlite"):
        rounds = [r for _, r, level, *_ in PrivacyLedger(ledger).entries() if level == "record"]
        assert len(rounds) == len(set(rounds)), (ledger.name, rounds)  # one charge per round

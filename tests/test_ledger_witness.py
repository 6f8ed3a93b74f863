"""A deployed node's ledger cannot vanish, be swapped or roll back unnoticed: each fault is
refused with its file and its fix, and the lifetime budget never goes back."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import agent_toml

from fedmoe.client.ledger import PrivacyLedger
from fedmoe.client.ledger_witness import (
    LedgerRefused,
    create_ledger,
    default_witness,
    open_ledger,
    restore_ledger,
)
from fedmoe.contract.keys import write_key_pair
from fedmoe.model.corpus import DEMO_DATA_DIR

BUDGETS = {"record": 10.0, "enterprise": None}


def _key(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_key_pair(folder / "node.key", folder / "node.pub")
    return folder / "node.key"


def _spend(ledger: PrivacyLedger, run: str, rounds: int, per_round: float = 1.0) -> None:
    for r in range(1, rounds + 1):
        ledger.charge(run, r, lambda level, k: (per_round * k, 1e-5), BUDGETS, max_releases=10)


def _node(tmp_path: Path, name: str = "a"):
    key = _key(tmp_path / name / "keys")
    path = tmp_path / name / "ledger.sqlite"
    return path, key, default_witness(key)


def test_a_new_ledger_is_stamped_and_witnessed_and_each_charge_updates_the_witness(tmp_path):
    path, key, witness = _node(tmp_path)
    create_ledger(path, key, "acme", witness)
    ledger = open_ledger(path, key, witness)
    assert ledger.identity().enterprise == "acme" and witness.is_file()
    _spend(ledger, "run-1", 2)
    assert '"charges": 4' in witness.read_text()  # one entry per level and round
    with pytest.raises(LedgerRefused, match="exists already"):
        create_ledger(path, key, "acme", witness)


def test_a_missing_ledger_is_refused_and_not_recreated_once_the_node_has_spent(tmp_path):
    path, key, witness = _node(tmp_path)
    with pytest.raises(LedgerRefused, match=r"no ledger at .*--new-ledger"):
        open_ledger(path, key, witness)
    _spend(create_ledger(path, key, "acme", witness), "run-1", 1)
    open_ledger(path, key, witness)  # the witness catches up with the charge
    path.unlink()
    with pytest.raises(LedgerRefused, match="missing, not new"):
        create_ledger(path, key, "acme", witness)
    assert not path.exists()


def test_another_nodes_ledger_is_refused(tmp_path):
    path, key, witness = _node(tmp_path, "a")
    other_path, other_key, other_witness = _node(tmp_path, "b")
    create_ledger(path, key, "a", witness)
    create_ledger(other_path, other_key, "b", other_witness)
    with pytest.raises(LedgerRefused, match=r"belongs to another node .* enterprise 'b'"):
        open_ledger(other_path, key, witness)


def test_a_rolled_back_ledger_is_refused_and_a_restore_carries_the_spend_back_in(tmp_path):
    path, key, witness = _node(tmp_path)
    ledger = open_ledger(create_ledger(path, key, "acme", witness).path, key, witness)
    _spend(ledger, "run-1", 2)
    backup = tmp_path / "backup.sqlite"
    shutil.copy(path, backup)
    _spend(ledger, "run-2", 3)
    spent = ledger.lifetime("record")
    assert spent == 5.0
    shutil.copy(backup, path)
    with pytest.raises(LedgerRefused, match=r"holds 4 charges, fewer than the 10 .* rolled back"):
        open_ledger(path, key, witness)
    said = restore_ledger(path, key, witness)
    assert any("lacks epsilon 3" in line for line in said), said
    restored = open_ledger(path, key, witness)
    assert restored.lifetime("record") == pytest.approx(spent)  # the budget never goes back


def test_a_damaged_ledger_is_refused_naming_the_file(tmp_path):
    path, key, witness = _node(tmp_path)
    create_ledger(path, key, "acme", witness)
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    with pytest.raises(LedgerRefused, match=r"ledger .* is damaged .* restore-ledger"):
        open_ledger(path, key, witness)


def test_a_ledger_ahead_of_its_witness_after_a_crash_is_accepted(tmp_path):
    path, key, witness = _node(tmp_path)
    create_ledger(path, key, "acme", witness)
    _spend(PrivacyLedger(path), "run-1", 2)  # charged, the witness never told (a crash)
    assert open_ledger(path, key, witness).charges() == 4
    assert '"charges": 4' in witness.read_text()


def test_a_ledger_whose_witness_is_missing_is_refused_until_an_operator_restores_it(tmp_path):
    path, key, witness = _node(tmp_path)
    _spend(open_ledger(create_ledger(path, key, "acme", witness).path, key, witness), "run-1", 2)
    witness.unlink()  # a rolled-back copy with its witness gone would otherwise pass
    with pytest.raises(LedgerRefused, match=r"witness .* is missing.*4 charges.*restore-ledger"):
        open_ledger(path, key, witness)
    said = restore_ledger(path, key, witness)
    assert any("no witness" in line and "4 charges" in line for line in said), said
    assert open_ledger(path, key, witness).lifetime("record") == 2.0


def test_damage_deep_in_the_ledger_is_found_when_it_opens(tmp_path):
    path, key, witness = _node(tmp_path)
    ledger = open_ledger(create_ledger(path, key, "acme", witness).path, key, witness)
    for run in range(6):
        _spend(ledger, f"run-{run}", 10, per_round=0.1)
    data = bytearray(path.read_bytes())
    assert len(data) > 3 * 4096
    data[-4096 + 8 : -4096 + 64] = b"\xab" * 56  # a page the first query never reads
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerRefused, match=r"is damaged .* restore-ledger"):
        open_ledger(path, key, witness)


def _agent(tmp_path: Path) -> tuple[Path, Path]:
    return agent_toml(tmp_path, DEMO_DATA_DIR / "finance"), tmp_path / "keys" / "node.key"


def _agent_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "agent", "--config", str(config), *args],
        cwd=config.parent, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


FAULTS = ["deleted", "another-nodes", "rolled-back", "damaged", "witness-missing"]


@pytest.mark.parametrize("fault", FAULTS)
def test_fedmoe_agent_refuses_a_faulty_ledger_with_exit_2_and_its_fix(tmp_path, fault):
    config, key = _agent(tmp_path)
    ledger_path = tmp_path / "state" / "ledger.sqlite"
    witness = default_witness(key)
    ledger = open_ledger(create_ledger(ledger_path, key, "acme", witness).path, key, witness)
    _spend(ledger, "run-1", 1)
    backup = tmp_path / "backup.sqlite"
    shutil.copy(ledger_path, backup)
    _spend(ledger, "run-2", 2)
    expected = {
        "deleted": "missing, not new",
        "another-nodes": "belongs to another node",
        "rolled-back": "rolled back",
        "damaged": "is damaged",
        "witness-missing": "is missing, so the ledger",
    }[fault]
    if fault == "deleted":
        ledger_path.unlink()
    elif fault == "another-nodes":
        other, other_key, other_witness = _node(tmp_path, "other")
        create_ledger(other, other_key, "other", other_witness)
        shutil.copy(other, ledger_path)
    elif fault == "rolled-back":
        shutil.copy(backup, ledger_path)
    elif fault == "damaged":
        ledger_path.write_bytes(b"\x00" * 100)
    else:
        shutil.copy(backup, ledger_path)  # rolled back, and the witness that would tell is gone
        witness.unlink()
    before = ledger_path.read_bytes() if ledger_path.exists() else None
    # An operator's new ledger does not reset it, whether it starts the agent or not.
    done = _agent_cli(config, "--new-ledger" if FAULTS.index(fault) % 2 else "new-ledger")
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert "ledger:" in output and expected in output and str(ledger_path) in output
    assert "restore-ledger" in output, output  # the command that fixes it
    assert not (tmp_path / "state" / "flower").exists()  # nothing started
    # The budget is never reset: the file is as it was (no new, empty ledger in its place).
    assert (ledger_path.read_bytes() if ledger_path.exists() else None) == before


def test_new_ledger_makes_the_ledger_once_and_exits(tmp_path):
    config, key = _agent(tmp_path)
    done = _agent_cli(config, "new-ledger")
    assert done.returncode == 0 and "made a new, empty ledger" in done.stdout, done.stderr
    ledger = PrivacyLedger(tmp_path / "state" / "ledger.sqlite")
    assert ledger.identity().enterprise == "acme" and default_witness(key).is_file()
    assert not (tmp_path / "state" / "flower").exists()  # it made the ledger, nothing else
    again = _agent_cli(config, "new-ledger")  # idempotent: this node's ledger is kept
    assert again.returncode == 0 and "exists already" in again.stdout, again.stderr

"""A user's own data: pointed at as a file or a folder, checked whole before anything starts (in
simulation and on an agent), judged by its own evaluation, never by the demo's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import agent_toml

from fedmoe.client.agent_config import load_agent_config
from fedmoe.coordinator.config import ConfigError, load_run_config
from fedmoe.coordinator.store.db import RunStore
from fedmoe.coordinator.store.outcome import ENTERPRISES, outcome
from fedmoe.model.corpus import generate, write_jsonl
from fedmoe.model.data import HELDOUT_SHARE, DataFiles, carve_heldout

BAD_DATA = {  # file name -> (content, what the error says)
    "empty.jsonl": (b"", "no records"),
    "no_text.jsonl": (
        b'{"text": "fine"}\n{"body": "no text"}\n',
        "record 2: a record needs a 'text'",
    ),
    "binary.jsonl": (bytes(range(256)) * 8, "not UTF-8"),
}


def _texts(n: int, word: str = "ticket") -> list[str]:
    return [f"{word} {i}: the printer on floor {i % 7} is jammed again" for i in range(n)]


def test_a_heldout_split_is_carved_by_a_fixed_rule_that_ignores_order():
    texts = _texts(500)
    train, heldout = carve_heldout(texts, Path("t.jsonl"))
    assert sorted(train + heldout) == sorted(texts)
    assert 0.5 * HELDOUT_SHARE * 500 < len(heldout) < 1.5 * HELDOUT_SHARE * 500
    again_train, again_heldout = carve_heldout(list(reversed(texts)) + texts[:3], Path("t"))
    assert set(again_heldout) == set(heldout)  # order and copies do not move a record
    assert not set(again_heldout) & set(again_train)
    assert len(carve_heldout(texts[:2], Path("t"))[1]) == 1  # at least one, however few
    with pytest.raises(ValueError, match="at least 2"):
        carve_heldout(texts[:1], Path("t.jsonl"))


def test_data_may_be_a_file_with_or_without_a_heldout_file(tmp_path):
    write_jsonl([{"text": t} for t in _texts(40)], tmp_path / "tickets.jsonl")
    write_jsonl([{"text": t} for t in _texts(5, "held")], tmp_path / "held.jsonl")
    carved = DataFiles.locate(tmp_path / "tickets.jsonl")
    assert (
        carved.heldout is None and len(carved.texts("train")) + len(carved.texts("heldout")) == 40
    )
    given = DataFiles.locate(tmp_path / "tickets.jsonl", tmp_path / "held.jsonl")
    assert len(given.texts("train")) == 40 and given.texts("heldout")[0].startswith("held 0")
    with pytest.raises(FileNotFoundError, match="or a folder holding train.jsonl"):
        DataFiles.locate(tmp_path / "nowhere.jsonl")


def _run_toml(tmp_path: Path, data: dict[str, str], extra: str = "") -> Path:
    lines = [extra]
    for name, path in data.items():
        lines.append(f"[[federation.enterprises]]\nname = '{name}'\ndata = '{path}'\n")
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_is_refused_before_a_run_naming_the_enterprise_and_record(tmp_path, name):
    content, says = BAD_DATA[name]
    (tmp_path / name).write_bytes(content)
    write_jsonl([{"text": t} for t in _texts(30)], tmp_path / "good.jsonl")
    config = _run_toml(tmp_path, {"good": "good.jsonl", "broken": name})
    with pytest.raises(ConfigError) as err:
        load_run_config(config)
    assert f"federation.enterprises.1.data: enterprise broken: {tmp_path / name}" in str(err.value)
    assert says in str(err.value) and "Bring your own data" in str(err.value)


def _cli(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("command", ["run", "plan"])
def test_fedmoe_run_and_plan_refuse_bad_data_with_exit_2_and_no_run_row(tmp_path, command):
    for name, (content, _) in BAD_DATA.items():
        (tmp_path / name).write_bytes(content)
    config = _run_toml(tmp_path, {n.split(".")[0]: n for n in BAD_DATA})
    done = _cli([command, "--config", str(config)], tmp_path)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2 and "Traceback" not in output, output[-3000:]
    for i, (name, (_, says)) in enumerate(BAD_DATA.items()):
        assert f"federation.enterprises.{i}.data: enterprise {name.split('.')[0]}" in output
        assert says in output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*BAD_DATA, "run.toml"])


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_an_agent_refuses_to_start_on_bad_data_and_says_why_to_its_operator(tmp_path, name):
    content, says = BAD_DATA[name]
    (tmp_path / name).write_bytes(content)
    config = agent_toml(tmp_path, tmp_path / name)
    with pytest.raises(ConfigError) as err:
        load_agent_config(config)
    assert f"data: {tmp_path / name}" in str(err.value) and says in str(err.value)


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_fedmoe_agent_start_on_bad_data_exits_2_and_leaves_nothing_running(tmp_path, name):
    content, says = BAD_DATA[name]
    (tmp_path / name).write_bytes(content)
    config = agent_toml(tmp_path, tmp_path / name)
    done = _cli(["agent", "--config", str(config)], tmp_path)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert f"data: {tmp_path / name}" in output and says in output
    assert not (tmp_path / "state").exists()  # no SuperNode, no ledger, no log: nothing started


def test_plan_says_what_the_result_of_a_run_on_own_data_rests_on(tmp_path, capsys, monkeypatch):
    from fedmoe.cli.main import main

    monkeypatch.chdir(tmp_path)
    for name in ("acme", "globex"):
        write_jsonl([{"text": t} for t in _texts(40)], tmp_path / f"{name}.jsonl")
    config = _run_toml(tmp_path, {"acme": "acme.jsonl", "globex": "globex.jsonl"})
    assert main(["plan", "--config", str(config)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the run's result: the best round by the enterprises' own held-out loss" in out
    assert "public_eval" not in out  # the demo's evaluation set is not for this data
    private = ["--set", "privacy.enterprise.epsilon=8", "--set", "privacy.accept_noisy_plan=true"]
    assert main(["plan", "--config", str(config), *private]) == 0
    assert "the run's result: the last committed round" in " ".join(capsys.readouterr().out.split())


def test_the_demo_evaluation_is_only_the_demo_federations(tmp_path):
    assert load_run_config(None).evaluation.server_data.endswith("public_eval.jsonl")
    write_jsonl([{"text": t} for t in _texts(40)], tmp_path / "a.jsonl")
    own = load_run_config(_run_toml(tmp_path, {"acme": "a.jsonl"}))
    assert own.evaluation.server_data is None
    assert "enterprises' own held-out loss" in own.result_basis()
    private = load_run_config(
        _run_toml(tmp_path, {"acme": "a.jsonl"}),
        {"privacy.enterprise.epsilon": 8.0, "privacy.accept_noisy_plan": True},
    )
    assert "the last committed round" in private.result_basis()
    chosen = load_run_config(
        _run_toml(tmp_path, {"acme": "a.jsonl"}, "[evaluation]\nserver_data = 'a.jsonl'\n")
    )
    assert chosen.evaluation.server_data == str(tmp_path / "a.jsonl")


@pytest.mark.e2e
def test_a_run_on_own_data_is_judged_by_its_own_heldout_loss(tmp_path):
    """Two enterprises of one's own (one a single file, its held-out split carved; one a
    folder): no demo evaluation, and the result is the best round by their held-out loss."""
    records = generate("finance", 240, seed=7)
    write_jsonl(records[:120], tmp_path / "tickets.jsonl")
    write_jsonl(records[120:220], tmp_path / "claims" / "train.jsonl")
    write_jsonl(records[220:], tmp_path / "claims" / "heldout.jsonl")
    config = _run_toml(
        tmp_path,
        {"tickets": "tickets.jsonl", "claims": "claims"},
        "[federation]\nrounds = 2\n[train]\nlocal_steps = 6\n",
    )
    done = _cli(["run", "--config", str(config)], tmp_path, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "the best round by the enterprises' own held-out loss" in output
    store = RunStore(f"sqlite:///{tmp_path / 'runs' / 'fedmoe.db'}")
    run = store.run(1)
    assert run.base_eval_loss is None  # no demo evaluation was run on someone else's domain
    result = outcome(store.rounds(1), run.base_eval_loss)
    assert result is not None and result.basis == ENTERPRISES
    assert result.best_round is not None and result.best_loss < result.base_loss, result
    assert f"result: round {result.best_round}, {ENTERPRISES}" in output
    participations = store.rounds(1)[0].participations
    assert {p.enterprise for p in participations} == {"tickets", "claims"}
    assert json.loads(json.dumps(run.config))["evaluation"].get("server_data") is None


def _deployed(registered: int, overrides: dict):
    from fedmoe.coordinator.config import apply_overrides, parse_run_config, resolve_for_deployment

    config = parse_run_config(apply_overrides({}, overrides))
    names = [f"e{i}" for i in range(registered)]
    return resolve_for_deployment(config, names, "sqlite:///:memory:", "/tmp/out")


@pytest.mark.parametrize("epsilon", [8.0, 30.0, 100.0])
@pytest.mark.parametrize("enterprises", [3, 10, 30])
def test_a_fix_an_enterprise_level_refusal_suggests_is_a_fix(epsilon, enterprises):
    plan = {"privacy.enterprise.epsilon": epsilon, "privacy.enterprise.delta": 1e-3}
    plan |= {"lora.r": 1, "lora.targets": ["attention"], "federation.rounds": 1}
    try:
        _deployed(enterprises, plan)
    except ConfigError as err:
        message = str(err)
    else:
        return  # accepted: nothing to fix
    assert "privacy.enterprise: the noise would swamp" in message
    if "secure_aggregation.enabled = true" in message:  # 10 and 30 enterprises, at 30 and 8
        _deployed(enterprises, plan | {"federation.secure_aggregation.enabled": True})
    more = int(message.split("more enterprises: >= ")[1].split(" ")[0].replace(",", ""))
    if more <= 300:
        _deployed(more, plan)


@pytest.mark.parametrize(("min_records", "sample_rate"), [(20, 0.02), (400, 0.005), (400, 0.02)])
def test_more_records_a_record_level_refusal_suggests_is_a_fix(min_records, sample_rate):
    # Below one record a step, the forecast's batch is 1: records * factor was no fix there.
    plan = {"privacy.record.epsilon": 8.0, "privacy.record.delta": 1e-7, "lora.r": 4}
    plan |= {"privacy.record.sample_rate": sample_rate, "privacy.record.min_records": min_records}
    with pytest.raises(ConfigError) as refused:
        _deployed(3, plan)
    message = str(refused.value)
    assert "privacy.record (every enterprise at min_records" in message, message
    needed = int(message.split("privacy.record.min_records >= ")[1].split(" ")[0].replace(",", ""))
    _deployed(3, plan | {"privacy.record.min_records": needed})


def test_a_deployed_record_level_run_is_forecast_on_its_declared_record_bound():
    record = {"privacy.record.epsilon": 8.0}
    with pytest.raises(ConfigError, match="privacy.record.min_records: a deployed run's utility"):
        _deployed(3, record)
    with pytest.raises(
        ConfigError, match=r"privacy.record \(every enterprise at min_records 400\): the noise"
    ):
        _deployed(3, record | {"privacy.record.min_records": 400})
    _deployed(
        3,
        record
        | {
            "privacy.record.min_records": 28_000,
            "lora.r": 4,
            "lora.targets": ["attention"],
            "privacy.record.sample_rate": 0.01,
        },
    )
    _deployed(3, record | {"privacy.accept_noisy_plan": True})  # the admin's explicit choice


FAILING_FIT = """
# Breaks EnterpriseNode.fit in every process of the run, when (and only if) that module is
# imported: importing it at start-up would slow every Ray process down.
import importlib.abc
import importlib.util
import os
import sys


def fit(self, parameters, config, secure_sum=None):
    raise OSError("the disk under the enterprise's data went away")


class Breaker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "fedmoe.client.enterprise":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.EnterpriseNode.fit = fit

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("FEDMOE_TEST_FAILING_FIT"):
    sys.meta_path.insert(0, Breaker())
"""


@pytest.mark.e2e
def test_a_run_whose_every_round_fails_names_the_enterprises_in_one_line_exit_1(tmp_path):
    """Every enterprise fails inside round 1 (a fault after the checks): the run ends with one
    error line naming each enterprise, exit code 1, no traceback on the terminal."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAILING_FIT)
    write_jsonl([{"text": t} for t in _texts(60)], tmp_path / "a.jsonl")
    write_jsonl([{"text": t} for t in _texts(60, "memo")], tmp_path / "b.jsonl")
    config = _run_toml(
        tmp_path, {"acme": "a.jsonl", "globex": "b.jsonl"}, "[federation]\nrounds = 2\n"
    )
    env = dict(os.environ, FEDMOE_TEST_FAILING_FIT="1", PYTHONPATH=str(hook))
    done = subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "run", "--config", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-4000:]
    assert "Traceback" not in output and "[fedmoe-timing]" not in output, output[-4000:]
    (error,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert "run 1 failed" in error and "0 usable update(s)" in error
    for name in ("acme", "globex"):
        assert f"{name}: OSError: the disk under the enterprise's data went away" in error

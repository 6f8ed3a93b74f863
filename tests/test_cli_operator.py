"""Operator basics: `--version`, `--json` on every listing, `fedmoe admin export|generate` through the
admin API, round time in `admin watch`, the wording of what the tables and the coordinator say,
and third-party warnings kept out of the commands' output.

The admin API runs in process on loopback (TLS, bearer tokens, the real servicer and coordinator
service, no SuperLink started) over a SQLite database holding finished runs with real adapter
checkpoints of the embedded base; one end-to-end test drives the `fedmoe coordinator` process."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import grpc
import pytest
import torch
from loopback import Loopback

from fedmoe.cli.main import main, quiet_third_party_noise
from fedmoe.coordinator.store.db import ParticipationRecord, RoundRecord, RunStore
from fedmoe.coordinator.store.outcome import outcome
from fedmoe.proto import admin_pb2 as pb

LONG_NODE_ID = "15787297569019954470"  # a Flower node id: 20 digits
SERVER_EVAL = {
    1: 0.9,
    2: 0.835,
}  # against a base of 1.0: 16.5% lower, where the old table said -17%


@pytest.fixture(autouse=True)
def _environment(monkeypatch):
    """main() sets HF_HUB_DISABLE_PROGRESS_BARS when unset: keep it from outliving a test."""
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _adapter(directory: Path, seed: int) -> None:
    """A real adapter checkpoint of the embedded base, with factors that change its output."""
    from fedmoe.model.base import load_base
    from fedmoe.model.lora import adapter_parameters, attach_lora, save_adapter
    from fedmoe.model.settings import LoraSettings

    settings = LoraSettings(r=2, alpha=4.0)
    model = attach_lora(load_base("embedded"), settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    save_adapter(model, settings, directory)


def finished_run(
    store: RunStore, storage: Path, beat_base: bool = True, server_eval: bool = True
) -> int:
    """A completed two-round deployment run with checkpoints, as the coordinator records one;
    without server evaluation, its enterprises' held-out losses fall from 2.0 to 1.8 and 1.7."""
    from fedmoe.coordinator.round.server_app import directory_sha256

    run_id = store.create_run(
        {"model": {"path": "embedded"}, "federation": {"rounds": 2}},
        planned_rounds=2,
        engine="deployment",
        enterprises=["clinical", "finance"],
        started_by="ops",
        privacy_plan={
            "secure_aggregation": True,
            "record": {"epsilon": 8.0, "delta": 1e-5, "clip": 1.0, "accountant": "rdp"},
        },
    )
    store.set_fingerprint(run_id, "3e63e78a1adf" + "0" * 52)
    if server_eval:
        store.set_base_eval(run_id, 1.0 if beat_base else 0.5)
    start = dt.datetime(2026, 12, 3, 9, 0, 0, tzinfo=dt.UTC)
    for number in (1, 2):
        checkpoint = storage / "runs" / f"run-{run_id:04d}" / f"round-{number:03d}"
        _adapter(checkpoint, seed=number)
        store.record_round(
            run_id,
            RoundRecord(
                number=number,
                started_at=start + dt.timedelta(seconds=20 * number),
                ended_at=start + dt.timedelta(seconds=20 * number + 9.5),
                status="completed",
                bytes_up=4096,
                bytes_down=8192,
                updates_seen=1,
                eval_loss=1.25,
                server_eval_loss=SERVER_EVAL[number] if server_eval else None,
                expert_load={"1": [3, 1]},
                checkpoint_path=str(checkpoint),
                checkpoint_sha256=directory_sha256(checkpoint),
                participations=[
                    ParticipationRecord(
                        node_id=LONG_NODE_ID,
                        status="ok",
                        enterprise="clinical",
                        epsilon_record=2.5 * number,
                        duration_s=8.25,
                        heldout_loss_before=2.0 if number == 1 else None,
                        eval_loss=2.0 - 0.1 * (number + 1),
                    ),
                    ParticipationRecord(
                        node_id="42",
                        status="refused" if number == 2 else "ok",
                        enterprise="finance",
                        epsilon_record=None if number == 2 else 2.5,
                        error="lifetime budget of 7.5 reached" if number == 2 else None,
                    ),
                ],
            ),
        )
    store.finish_run(run_id, "completed")
    return run_id


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """The admin API of a real coordinator service, in process, over a database of two finished
    runs: run 1 beat its base model, run 2 did not."""
    from fedmoe.coordinator.service.admin_api import serve
    from fedmoe.coordinator.service.service import CoordinatorService
    from fedmoe.coordinator.service.service_config import load_coordinator_config

    loop = Loopback(tmp_path_factory.mktemp("operator"))
    service = CoordinatorService(
        load_coordinator_config(loop.root / "coordinator.toml"), say=lambda *a, **k: None
    )
    finished_run(service.store, service.storage, beat_base=True)
    finished_run(service.store, service.storage, beat_base=False)
    certs = loop.certs
    server = serve(
        service,
        f"127.0.0.1:{loop.admin_port}",
        (certs / "server.pem").read_bytes(),
        (certs / "server.key").read_bytes(),
    )
    loop.service = service
    try:
        yield loop
    finally:
        server.stop(grace=None).wait()
        loop.close()
        service.store.close()


def admin(loop: Loopback, *args: str) -> list[str]:
    return [
        "admin",
        "--address",
        f"127.0.0.1:{loop.admin_port}",
        "--ca",
        str(loop.certs / "ca.pem"),
        *args,
    ]


@pytest.fixture
def token(coordinator, monkeypatch):
    monkeypatch.setenv("FEDMOE_ADMIN_TOKEN", coordinator.token)


def _json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # the whole of stdout is one JSON document


# --- --version ----------------------------------------------------------------------------------
def test_version_prints_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedmoe {version('fedmoe')}"


# --- --json and the tables -----------------------------------------------------------------------
RUN_FIELDS = {
    "run_id", "status", "engine", "completed_rounds", "planned_rounds", "started_at", "ended_at",
    "resumes", "base_fingerprint", "base_eval_loss", "result_basis", "result_base_loss",
    "best_round_loss", "result_round", "result_gain", "enterprises", "started_by", "privacy",
    "error",
}  # fmt: skip
ROUND_FIELDS = {
    "number", "status", "started_at", "ended_at", "duration_s", "participants", "failures",
    "train_loss", "eval_loss", "server_eval_loss", "update_norm", "bytes_up", "bytes_down",
    "updates_seen", "expert_load", "expert_load_imbalance", "checkpoint_path",
    "checkpoint_sha256", "participations",
}  # fmt: skip
PARTICIPATION_FIELDS = {
    "enterprise", "node_id", "status", "num_examples", "train_loss", "heldout_loss_before",
    "eval_loss", "update_norm", "duration_s", "epsilon_record", "epsilon_enterprise", "error",
}  # fmt: skip


def test_local_listings_print_json_with_stable_field_names(coordinator, capsys):
    db = ["--database", coordinator.database_url]
    runs = _json(capsys, ["runs", "--json", *db])["runs"]
    assert all(set(r) == RUN_FIELDS for r in runs)
    first, second = runs[:2]
    assert first["run_id"] == 1 and first["status"] == "completed"
    assert (first["completed_rounds"], first["planned_rounds"]) == (2, 2)
    assert first["result_round"] == 2 and first["best_round_loss"] == pytest.approx(0.835)
    assert first["result_gain"] == pytest.approx(0.165) and first["base_eval_loss"] == 1.0
    assert first["result_basis"] == "server eval" and first["result_base_loss"] == 1.0
    assert second["result_round"] is None and second["result_gain"] == 0.0  # the base model kept
    assert first["base_fingerprint"] == "3e63e78a1adf" + "0" * 52  # in full, unlike the table
    assert first["started_at"].endswith("+00:00") and first["enterprises"] == [
        "clinical",
        "finance",
    ]

    rounds = _json(capsys, ["rounds", "1", "--json", *db])
    assert rounds["run_id"] == 1 and [r["number"] for r in rounds["rounds"]] == [1, 2]
    first_round = rounds["rounds"][0]
    assert set(first_round) == ROUND_FIELDS
    assert first_round["duration_s"] == 9.5 and first_round["expert_load"] == {"1": [3, 1]}
    assert first_round["expert_load_imbalance"] == {"1": 1.5} and first_round["train_loss"] is None
    clinical = first_round["participations"][0]
    assert set(clinical) == PARTICIPATION_FIELDS
    assert clinical["node_id"] == LONG_NODE_ID and clinical["epsilon_record"] == 2.5

    privacy = _json(capsys, ["privacy", "--json", *db])
    assert set(privacy) == {"runs", "spent", "rounds"}
    plan = privacy["runs"][0]
    assert plan["record_epsilon"] == 8.0 and plan["enterprise_epsilon"] is None
    assert plan["secure_aggregation"] is True and plan["audit"] is None
    spent = {(s["run_id"], s["enterprise"]): s for s in privacy["spent"]}
    assert spent[1, "clinical"]["record_epsilon"] == 5.0
    assert spent[1, "finance"]["rounds_charged"] == 1  # refused round 2: not charged
    assert {"run_id", "round", "enterprise", "status", "epsilon_record", "epsilon_enterprise",
            "note"} == set(privacy["rounds"][0])  # fmt: skip
    # Every round of every enterprise, without --rounds too: 2 rounds x 2 enterprises per run.
    assert len([e for e in privacy["rounds"] if e["run_id"] == 1]) == 4


def test_json_errors_go_to_stderr_and_leave_stdout_empty(tmp_path, capsys):
    assert main(["runs", "--json", "--database", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "error:" in captured.err


def test_the_runs_table_says_what_the_run_said(coordinator, capsys):
    """The run's final line says "16.5% lower"; the table says the same, not "-17%"."""
    store = coordinator.service.store
    said = outcome(store.rounds(1), store.run(1).base_eval_loss).describe()
    assert "(16.5% lower)" in said
    assert main(["runs", "--database", coordinator.database_url]) == 0
    table = capsys.readouterr().out
    assert "round 2: 0.8350 vs base 1.0000 (16.5% lower)" in table and "-17%" not in table
    assert "WORSE: base kept (0.8350 vs 0.5000)" in table


def test_a_result_chosen_by_the_enterprises_held_out_loss_says_so(tmp_path, capsys):
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    run_id = finished_run(store, tmp_path, server_eval=False)
    said = outcome(store.rounds(run_id), None).describe()
    assert "result: round 2, enterprises' held-out loss 1.7000 vs base 2.0000 (15.0% lower)" == said
    assert main(["runs", "--database", store.engine.url.render_as_string()]) == 0
    row = "round 2: 1.7000 vs base 2.0000 (15.0% lower; enterprises' held-out loss)"
    assert row in capsys.readouterr().out
    run = _json(capsys, ["runs", "--json", "--database", store.engine.url.render_as_string()])
    assert run["runs"][0]["base_eval_loss"] is None
    assert run["runs"][0]["result_basis"] == "enterprises' held-out loss"
    assert run["runs"][0]["result_base_loss"] == 2.0 and run["runs"][0]["result_round"] == 2


def test_node_ids_are_shown_in_full_in_every_table(coordinator, capsys):
    db = ["--database", coordinator.database_url]
    assert main(["rounds", "1", "--clients", *db]) == 0
    assert LONG_NODE_ID in capsys.readouterr().out


def test_admin_listings_print_the_same_json_as_the_local_commands(coordinator, token, capsys):
    db = ["--database", coordinator.database_url]
    for local, remote in (
        (["runs"], ["runs"]),
        (["rounds", "1"], ["rounds", "1"]),
        (["privacy"], ["ledger"]),
        (["privacy", "1"], ["ledger", "1"]),
    ):
        assert _json(capsys, [*local, "--json", *db]) == _json(
            capsys, admin(coordinator, *remote, "--json")
        )
    one = _json(capsys, admin(coordinator, "run", "1", "--json"))
    assert [r["run_id"] for r in one["runs"]] == [1] and set(one["runs"][0]) == RUN_FIELDS
    nodes = _json(capsys, admin(coordinator, "nodes", "list", "--json"))
    assert nodes == {"nodes": []}


def test_admin_watch_lines_carry_the_round_time(coordinator, token, capsys):
    assert main(admin(coordinator, "watch", "1")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "[fedmoe] run 1 round 1/2 completed | clients 2/2" in lines[0]
    assert lines[0].endswith("| 9.5s") and lines[1].endswith("| refused 1 | 9.5s")


def test_the_agent_ledger_prints_json(tmp_path, capsys):
    from fedmoe.client.ledger import PrivacyLedger

    path = tmp_path / "ledger.sqlite"
    PrivacyLedger(path)
    document = _json(capsys, ["agent", "ledger", str(path), "--json"])
    assert document["ledger"] == str(path) and document["entries"] == []
    assert document["lifetime"] == {
        "record": {"epsilon": 0.0, "delta": 0.0},
        "enterprise": {"epsilon": 0.0, "delta": 0.0},
    }


# --- words ---------------------------------------------------------------------------------------
def test_counts_and_the_shutdown_line_read_right_for_zero_one_and_many():
    from fedmoe.coordinator.service.service import shutdown_line
    from fedmoe.support.words import plural

    assert [plural(n, "round") for n in (0, 1, 2)] == ["0 rounds", "1 round", "2 rounds"]
    assert shutdown_line("SIGTERM", []) == "stopping (SIGTERM); no run is in flight"
    assert shutdown_line("SIGTERM", [3]) == (
        "stopping (SIGTERM); run 3 resumes when the coordinator starts again"
    )
    assert shutdown_line("SIGINT", [3, 4, 7]) == (
        "stopping (SIGINT); runs 3, 4 and 7 resume when the coordinator starts again"
    )


# --- warnings ------------------------------------------------------------------------------------
def test_third_party_noise_is_filtered_and_other_warnings_still_show():
    from conftest import tiny_model

    from fedmoe.model.lora import attach_lora
    from fedmoe.model.settings import LoraSettings

    def future_warnings(quiet: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if quiet:
                quiet_third_party_noise()
            attach_lora(tiny_model(), LoraSettings(r=2, alpha=4.0, targets=("attention",)))
            warnings.warn("ours, not noise", FutureWarning, stacklevel=1)
        return [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]

    noisy = future_warnings(quiet=False)
    # If peft and transformers stop saying it, drop its filter from cli/main.py's NOISE.
    assert any("is_gradient_checkpointing" in m for m in noisy), noisy
    assert future_warnings(quiet=True) == ["ours, not noise"]


# --- admin export and generate -------------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_admin_export_streams_what_fedmoe_export_writes(coordinator, token, tmp_path, capsys):
    from fedmoe.coordinator.store.artifacts import export

    checkpoint = Path(coordinator.service.store.rounds(1)[1].checkpoint_path)
    assert main(admin(coordinator, "export", "1", "--out", str(tmp_path / "peft"))) == 0
    assert "wrote run 1 round 2's peft adapter" in capsys.readouterr().out
    export("embedded", checkpoint, tmp_path / "local", merge=False)
    assert _files(tmp_path / "peft") == _files(tmp_path / "local")

    assert main(admin(coordinator, "export", "1", "--round", "1", "--checkpoint", "--out",
                      str(tmp_path / "raw"))) == 0  # fmt: skip
    round_1 = Path(coordinator.service.store.rounds(1)[0].checkpoint_path)
    assert _files(tmp_path / "raw") == _files(round_1)

    assert (
        main(admin(coordinator, "export", "1", "--merge", "--out", str(tmp_path / "merged"))) == 0
    )
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (
        config["model_type"] == "deepseek_v3" and (tmp_path / "merged" / "tokenizer.json").is_file()
    )
    # Nothing is left behind: not on the coordinator, not beside --out.
    assert not any((coordinator.service.storage / "exports").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "merged", "peft", "raw"]


def test_admin_export_refusals_are_clear_and_leave_nothing(coordinator, token, tmp_path, capsys):
    cases = [
        (["export", "2"], "FAILED_PRECONDITION: run 2 has no adapter to export"),
        (["export", "9"], "NOT_FOUND: run 9 not found"),
        (["export", "1", "--round", "7"], "NOT_FOUND: run 1 has no completed checkpoint for round 7"),
    ]  # fmt: skip
    for args, error in cases:
        assert main(admin(coordinator, *args, "--out", str(tmp_path / "out"))) == 1
        assert error in capsys.readouterr().out
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(admin(coordinator, "export", "1", "--out", str(tmp_path / "full"))) == 2
    assert "is not empty" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_an_export_over_the_cap_is_refused_before_anything_is_sent(
    coordinator, token, tmp_path, capsys
):
    service = coordinator.service
    config = service.config
    admin_section = config.admin.model_copy(update={"max_export_bytes": 4096})
    service.config = config.model_copy(update={"admin": admin_section})
    try:
        for fmt in ((), ("--merge",)):
            assert main(admin(coordinator, "export", "1", *fmt, "--out", str(tmp_path / "o"))) == 1
            out = capsys.readouterr().out
            assert "RESOURCE_EXHAUSTED" in out and "admin.max_export_bytes" in out, out
            assert "over the admin API's limit of 4,096" in out
    finally:
        service.config = config
    assert list(tmp_path.iterdir()) == [] and not any((service.storage / "exports").iterdir())


def test_the_cli_keeps_nothing_a_coordinator_sends_outside_its_manifest(tmp_path):
    import hashlib

    from fedmoe.cli.admin import AdminCallFailed, _receive_export

    def stream(name: str, data: bytes, digest: str | None = None):
        digest = digest or hashlib.sha256(data).hexdigest()
        files = [pb.ExportFile(path=name, size=len(data), sha256=digest)]
        yield pb.ExportChunk(manifest=pb.ExportManifest(files=files, total_bytes=len(data)))
        yield pb.ExportChunk(chunk=pb.FileChunk(path=name, data=data))

    for i, (name, digest, words) in enumerate(
        (
            ("../escape", None, "sent a file named '../escape'"),
            ("/etc/passwd", None, "sent a file named '/etc/passwd'"),
            ("ok.bin", "0" * 64, "different SHA-256"),
        )
    ):
        folder = tmp_path / f"case-{i}"
        folder.mkdir()
        with pytest.raises(AdminCallFailed, match=words):
            _receive_export(stream(name, b"data", digest), folder)
    assert not (tmp_path / "escape").exists()
    unlisted = [pb.ExportChunk(chunk=pb.FileChunk(path="x", data=b"1"))]
    with pytest.raises(AdminCallFailed, match="outside its manifest"):
        _receive_export(iter(unlisted), tmp_path / "case-0")


def test_export_and_generate_need_a_valid_token(coordinator):
    for metadata in ([], [("authorization", "Bearer nope")]):
        with pytest.raises(grpc.RpcError) as err:
            list(
                coordinator.stub.ExportRun(
                    pb.ExportRunRequest(run_id=1), metadata=metadata, timeout=10
                )
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            coordinator.call(
                "Generate", pb.GenerateRequest(run_id=1, prompt="x"), metadata=metadata
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_generate_uses_the_runs_result_on_the_coordinator(coordinator, token, capsys):
    from fedmoe.coordinator.store.artifacts import generate

    checkpoint = Path(coordinator.service.store.rounds(1)[1].checkpoint_path)
    prompt = "QC log line 3 lot 4521:"
    args = ["generate", "1", "--prompt", prompt, "--max-new-tokens", "8"]
    assert main(admin(coordinator, *args)) == 0
    assert capsys.readouterr().out.strip() == prompt + generate("embedded", checkpoint, prompt, 8)
    reply = coordinator.call("Generate", pb.GenerateRequest(run_id=2, prompt=prompt))
    assert reply.round == 0 and "no round beat the base model" in reply.note  # the base model
    assert reply.text == generate("embedded", None, prompt, 48)


@pytest.mark.parametrize(
    "request_fields, code, words",
    [
        (dict(prompt=""), "INVALID_ARGUMENT", "prompt: 1-8192 characters (got 0)"),
        (dict(prompt="x" * 8193), "INVALID_ARGUMENT", "prompt: 1-8192 characters (got 8193)"),
        (dict(max_new_tokens=0), "INVALID_ARGUMENT", "max_new_tokens: must be in [1, 1024] (got 0)"),
        (dict(max_new_tokens=1025), "INVALID_ARGUMENT", "max_new_tokens: must be in [1, 1024]"),
        (dict(max_new_tokens=600), "INVALID_ARGUMENT", "exceed the model's 512 positions"),
        (dict(temperature=-1.0), "INVALID_ARGUMENT", "temperature: must be in [0, 10]"),
        (dict(temperature=float("nan")), "INVALID_ARGUMENT", "temperature: must be in [0, 10]"),
        (dict(run_id=0), "INVALID_ARGUMENT", "run_id: must be >= 1"),
        (dict(run_id=99), "NOT_FOUND", "run 99 not found"),
        (dict(round=5), "NOT_FOUND", "no completed checkpoint for round 5"),
    ],
)  # fmt: skip
def test_bad_generate_requests_name_the_field_and_its_range(
    coordinator, request_fields, code, words
):
    fields = {"run_id": 1, "prompt": "QC log line 3", **request_fields}
    with pytest.raises(grpc.RpcError) as err:
        coordinator.call("Generate", pb.GenerateRequest(**fields), timeout=60)
    assert err.value.code().name == code and words in err.value.details(), err.value.details()


def test_bad_export_requests_name_the_field(coordinator):
    with pytest.raises(grpc.RpcError) as err:
        list(coordinator.stub.ExportRun(pb.ExportRunRequest(run_id=1, format="zip"),
                                        metadata=coordinator.metadata, timeout=30))  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "format: one of peft, merged, checkpoint (got 'zip')" in err.value.details()


def test_a_checkpoint_changed_since_its_round_committed_is_not_handed_out(
    coordinator, tmp_path, monkeypatch
):
    store = coordinator.service.store
    run_id = finished_run(store, tmp_path / "storage")
    tampered = Path(store.rounds(run_id)[1].checkpoint_path) / "expert_lora_config.json"
    tampered.write_text(tampered.read_text() + " ")
    with pytest.raises(grpc.RpcError) as err:
        coordinator.call("Generate", pb.GenerateRequest(run_id=run_id, prompt="x"), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "changed since the round committed" in err.value.details()


# --- end to end: the `fedmoe coordinator` process and the `fedmoe` command --------------------------
@pytest.mark.e2e
def test_admin_export_and_generate_against_a_running_coordinator(tmp_path, monkeypatch):
    loop = Loopback(tmp_path)
    store = RunStore(loop.database_url)
    run_id = finished_run(store, tmp_path / "state")
    store.close()
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env.update(
        FEDMOE_ADMIN_TOKEN=loop.token,
        FEDMOE_ADMIN_CA=str(loop.certs / "ca.pem"),
        FEDMOE_ADMIN_ADDRESS=f"127.0.0.1:{loop.admin_port}",
    )
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")  # the coordinator's own command sets it

    def fedmoe(*args):
        return subprocess.run(
            [sys.executable, "-m", "fedmoe.cli", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    try:
        loop.start_coordinator()
        exported = fedmoe("admin", "export", str(run_id), "--out", "adapter")
        assert exported.returncode == 0, exported.stdout + exported.stderr
        assert (tmp_path / "adapter" / "adapter_config.json").is_file()
        generated = fedmoe(
            "admin", "generate", str(run_id), "--prompt", "QC log", "--max-new-tokens", "6"
        )
        assert generated.returncode == 0 and generated.stdout.startswith("QC log"), generated.stderr
        assert "FutureWarning" not in exported.stderr + generated.stderr
        listed = fedmoe("admin", "runs", "--json")
        assert json.loads(listed.stdout)["runs"][0]["result_round"] == 2
    finally:
        loop.close()
    log = loop.log("coordinator")
    assert f"run {run_id} round 2 exported (peft" in log and "no run is in flight" in log
    assert "Loading weights" not in log and "FutureWarning" not in log


def test_nodes_list_says_which_agents_are_ready_and_shows_node_ids_in_full(capsys):
    from types import SimpleNamespace

    from fedmoe.cli.tables import node_rows, print_nodes
    from fedmoe.proto import admin_pb2 as pb

    long_id = "15787297569019954470"
    nodes = [
        pb.Node(enterprise="finance", status="active", online=True, flower_node_id=long_id),
        pb.Node(enterprise="clinical", status="active", online=False),
        pb.Node(enterprise="spare", status="revoked", online=False),
    ]
    rows = node_rows(nodes)
    assert [r["state"] for r in rows] == ["ready", "not connected", "revoked"]
    print_nodes(SimpleNamespace(json=False), rows)
    out = capsys.readouterr().out
    assert long_id in out and "ready" in out
    assert "tells only its own operator why" in out

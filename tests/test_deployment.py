"""End to end on the deployment engine, as enterprises run it: `fedmoe coordinator` on PostgreSQL
and three `fedmoe agent`s on loopback, TLS, registered node keys, runs through the admin API.

One deployment serves the module (starting it costs ~20 s); tests that break it (killing agents
or the coordinator) come last and restore what they kill."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
import tomllib

import grpc
import httpx
import pytest
from browser import CHROMIUM, MISSING, signed_in_page
from loopback import Loopback, free_port
from prometheus_client.parser import text_string_to_metric_families

from fedmoe.client.ledger import PrivacyLedger
from fedmoe.coordinator.store.db import RunStore
from fedmoe.model.corpus import DEMO_DATA_DIR
from fedmoe.proto import admin_pb2 as pb

pytestmark = pytest.mark.e2e
ENTERPRISES = ("finance", "clinical", "manufacturing")
QUICK = ("train.local_steps=4", "lora.r=4", "lora.alpha=8.0")
PRIVATE = """
[federation]
rounds = 2
secure_aggregation = { enabled = true }
[train]
local_steps = 3
batch_size = 8
[lora]
r = 4
alpha = 8.0
[privacy]
accept_noisy_plan = true  # the tiny demo is far too small to learn privately
[privacy.record]
epsilon = 8.0
[privacy.enterprise]
epsilon = 8.0
clip = 0.05
[evaluation]
server_data = "demo"  # the agents hold the demo federation's data
"""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, request):
    postgres_url = request.getfixturevalue("module_postgres_url")
    loop = Loopback(tmp_path_factory.mktemp("deployment"), database_url=postgres_url)
    try:
        with open(loop.root / "coordinator.toml", "a") as toml:  # /metrics, scraped below
            toml.write(f'[metrics]\naddress = "127.0.0.1:{free_port()}"\n')
            toml.write(f'[dashboard]\naddress = "127.0.0.1:{free_port()}"\n')  # and its pages
        loop.start_coordinator()
        for name in ENTERPRISES:
            # finance budgets record-level epsilon: it refuses non-private runs, and pays for one
            # round of the private run below, not two.
            budget = {"record_epsilon": 7.5} if name == "finance" else None
            toml = loop.add_agent(name, DEMO_DATA_DIR / name, budget) / "agent.toml"
            toml.write_text(f'metrics_address = "127.0.0.1:{free_port()}"\n' + toml.read_text())
            loop.register(name)
        loop.pin_federation(ENTERPRISES)
        # manufacturing's agent calls itself "finance": the coordinator must not believe it.
        agent_toml = loop.root / "agents" / "manufacturing" / "agent.toml"
        agent_toml.write_text(
            agent_toml.read_text().replace('name = "manufacturing"', 'name = "finance"')
        )
        for name in ENTERPRISES:
            loop.start_agent(name)
        loop.wait_online(list(ENTERPRISES))
        yield loop
    finally:
        loop.close()


def test_a_run_through_the_admin_api_streams_rounds_and_records_everything(deployment):
    with contextlib.ExitStack() as stack:
        if CHROMIUM is None:
            print(MISSING)
        else:  # the dashboard's runs page, open in Chromium while the run goes on
            address = tomllib.loads((deployment.root / "coordinator.toml").read_text())
            url = f"https://{address['dashboard']['address']}"
            page, requests = stack.enter_context(signed_in_page(url, deployment.token))
        run = deployment.start_run(overrides=("federation.rounds=3", *QUICK))
        if CHROMIUM is not None:
            _dashboard_follows(page, requests, url, run.id, deployment)
    assert (
        run.engine == "deployment"
        and sorted(run.enterprises) == sorted(ENTERPRISES)
        and run.started_by == "ops"
    )
    events = deployment.watch(run.id)
    rounds = [e.round.number for e in events if e.HasField("round")]
    assert rounds == [1, 2, 3] and events[-1].run.status == "completed", [
        e.run.error for e in events
    ][-1]
    assert [e.run.status for e in events if not e.HasField("round")][-1] == "completed"
    store = RunStore(deployment.database_url, migrate=False)
    records = store.rounds(run.id)
    assert [r.status for r in records] == ["completed"] * 3 and all(
        r.updates_seen == 2 for r in records
    )
    for r in records:
        by_name = {p.enterprise: p for p in r.participations}
        # Names come from the registry: manufacturing's claim to be finance changes nothing.
        assert set(by_name) == set(ENTERPRISES)
        assert (
            by_name["finance"].status == "refused"
            and "no record-level privacy guarantee" in by_name["finance"].error
        )
        assert by_name["clinical"].status == by_name["manufacturing"].status == "ok"
        assert (r.checkpoint_path and r.checkpoint_sha256) and r.eval_loss is not None
    assert (store.run(run.id).config["output"]["dir"]) in records[-1].checkpoint_path
    ledger = deployment.call("GetPrivacyLedger", pb.GetPrivacyLedgerRequest(run_id=run.id))
    assert len(ledger.entries) == 9 and ledger.runs[0].run_id == run.id
    assert f"run {run.id} started by ops" in deployment.log("coordinator")


def _dashboard_follows(page, requests, url, run_id, deployment) -> None:
    """The runs page shows the run's rounds as they commit, without a reload; then the run page
    draws the losses the database holds. Nothing is fetched from anywhere but the coordinator."""
    page.goto(url + "/runs")
    cell = page.locator(f'tr[data-run="{run_id}"] td.rounds')
    seen: list[str] = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and (not seen or seen[-1] != "3 / 3"):
        text = cell.inner_text() if cell.count() else ""
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        time.sleep(0.2)
    assert seen[-1] == "3 / 3" and len(seen) >= 2, seen  # it moved while the page stayed open
    page.screenshot(path=deployment.root / "dashboard-runs.png", full_page=True)
    store = RunStore(deployment.database_url, migrate=False)
    page.goto(f"{url}/runs/{run_id}")
    marks = page.locator('#chart-loss circle[data-series="federated eval"]')
    drawn = [float(m.get_attribute("data-y")) for m in marks.all()]
    assert drawn == [r.eval_loss for r in store.rounds(run_id)] and len(drawn) == 3
    page.screenshot(path=deployment.root / "dashboard-run.png", full_page=True)
    assert all(u.startswith(url + "/") for u in requests), requests


def test_a_private_run_with_secure_aggregation_enforces_each_nodes_budget(deployment):
    run = deployment.start_run(PRIVATE)
    assert "record-level DP-SGD eps 8" in run.privacy and "secure aggregation on" in run.privacy
    final = deployment.wait_for(run.id, ("completed", "failed", "budget_spent"))
    assert final.status == "completed", final.error
    store = RunStore(deployment.database_url, migrate=False)
    rounds = store.rounds(run.id)
    assert all(r.updates_seen == 1 for r in rounds)  # the coordinator only ever saw the masked sum
    assert all(r.server_eval_loss < 1.5 for r in rounds)  # and could unmask it (same mask PRG)
    finance = [next(p for p in r.participations if p.enterprise == "finance") for r in rounds]
    assert [p.status for p in finance] == ["ok", "refused"] and "lifetime budget of 7.5" in finance[
        1
    ].error
    for r in rounds:
        for p in r.participations:
            if p.status == "ok":
                assert (
                    p.epsilon_record <= 8.0 + 1e-9
                    and p.epsilon_enterprise <= 8.0 + 1e-9
                    and p.train_loss is None
                )
    finance_ledger = PrivacyLedger(
        deployment.root / "agents" / "finance" / "state" / "ledger.sqlite"
    )
    assert 0 < finance_ledger.lifetime("record") <= 7.5
    # The live /metrics of the coordinator and of finance's agent, as Prometheus parses them.
    coordinator, agent = scrape(deployment, "coordinator"), scrape(deployment, "finance")
    assert "; metrics at https://127.0.0.1:" in deployment.log("coordinator")
    assert "metrics at http://127.0.0.1:" in deployment.log("finance")
    committed = sum(r.status == "completed" for x in store.runs() for r in store.rounds(x.id))
    assert sample(coordinator, "fedmoe_rounds_committed_total") == committed
    assert sample(coordinator, "fedmoe_run_rounds_completed", run=str(run.id)) == len(rounds) == 2
    numbers = finance_ledger.run_numbers()
    charged = [e for e in finance_ledger.entries() if numbers.get(e[0].split(":")[0]) == run.id]
    for level in ("record", "enterprise"):
        latest = {  # the last epsilon each enterprise reported, in round order
            p.enterprise: getattr(p, f"epsilon_{level}")
            for r in rounds
            for p in r.participations
            if getattr(p, f"epsilon_{level}") is not None
        }
        assert set(latest) == set(ENTERPRISES)
        for enterprise, eps in latest.items():
            labels = {"run": str(run.id), "enterprise": enterprise, "level": level}
            assert sample(coordinator, "fedmoe_epsilon_spent", **labels) == eps
        # What finance told the coordinator is what its own ledger charged for this run.
        assert max(e[3] for e in charged if e[2] == level) == latest["finance"]
        lifetime = sample(agent, "fedmoe_agent_lifetime_epsilon", level=level)
        assert lifetime == finance_ledger.lifetime(level)
    assert sample(agent, "fedmoe_agent_budget_epsilon", level="record") == 7.5
    assert sample(agent, "fedmoe_agent_charges_total") == finance_ledger.charges() > 0
    assert sample(agent, "fedmoe_agent_refusals_total") >= 1
    info = [dict(labels) for name, labels in agent if name == "fedmoe_agent_last_refusal_info"]
    assert (
        info == [{"reason": finance[1].error[:200]}]
        and "lifetime budget of 7.5" in info[0]["reason"]
    )


def test_the_agents_port_serves_tls_and_the_fleet_api_only(deployment):
    with socket.create_connection(("127.0.0.1", deployment.agents_port), timeout=5) as plain:
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not plain.recv(1024).startswith(b"HTTP/1.1 200")  # a plaintext client gets no answer
    tls = ssl.create_default_context(cafile=str(deployment.certs / "ca.pem"))
    with httpx.Client(base_url=f"https://127.0.0.1:{deployment.agents_port}", verify=tls) as client:
        assert client.get("/health").status_code == 200
        # Flower's Control API (runs = code the coordinator executes) is unreachable from outside.
        for path in (
            "/v1/control/start-run",
            "/v1/control/list-runs",
            "/v1/control/register-node",
            "/v1/runtime/acquire-task",
        ):
            assert client.post(path, content=b"").status_code == 404
    insecure = grpc.insecure_channel(f"127.0.0.1:{deployment.admin_port}")
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc_stub(insecure).ListRuns(
            pb.ListRunsRequest(), metadata=deployment.metadata, timeout=5
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def scrape(deployment, who: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value: the live /metrics of the coordinator (HTTPS against the
    deployment's CA) or of one agent (plain HTTP)."""
    if who == "coordinator":
        config = tomllib.loads((deployment.root / "coordinator.toml").read_text())
        url, verify = (
            f"https://{config['metrics']['address']}/metrics",
            ssl.create_default_context(cafile=str(deployment.certs / "ca.pem")),
        )
    else:
        config = tomllib.loads((deployment.root / "agents" / who / "agent.toml").read_text())
        url, verify = f"http://{config['metrics_address']}/metrics", False
    text = httpx.get(url, verify=verify, timeout=10).raise_for_status().text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def pb_grpc_stub(channel):
    from fedmoe.proto import admin_pb2_grpc

    return admin_pb2_grpc.AdminStub(channel)


def test_an_admin_call_without_credentials_changes_nothing(deployment):
    store = RunStore(deployment.database_url, migrate=False)
    before = (len(store.runs()), len(store.nodes(include_revoked=True)))
    for metadata in (
        [],
        [("authorization", "Bearer not-a-token")],
        [("authorization", deployment.token)],
    ):
        for method, request in (
            ("StartRun", pb.StartRunRequest()),
            (
                "RegisterNode",
                pb.RegisterNodeRequest(enterprise="mallory", public_key="ssh-ed25519 AAAA"),
            ),
            ("RevokeNode", pb.RevokeNodeRequest(enterprise="clinical")),
            ("ListRuns", pb.ListRunsRequest()),
            ("Generate", pb.GenerateRequest(run_id=1, prompt="x")),
        ):
            with pytest.raises(grpc.RpcError) as err:
                deployment.call(method, request, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(
                deployment.stub.WatchRun(
                    pb.WatchRunRequest(run_id=1), metadata=metadata, timeout=10
                )
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(
                deployment.stub.ExportRun(
                    pb.ExportRunRequest(run_id=1), metadata=metadata, timeout=10
                )
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (len(store.runs()), len(store.nodes(include_revoked=True))) == before
    assert "refused an admin call without a valid token" in deployment.log("coordinator")


def test_unregistered_and_revoked_keys_are_refused(deployment):
    # An agent whose key nobody registered never joins.
    deployment.add_agent("intruder", DEMO_DATA_DIR / "finance")
    deployment.start_agent("intruder")
    # A registered one joins, and is cut off for good once revoked.
    deployment.add_agent("spare", DEMO_DATA_DIR / "clinical")
    deployment.register("spare")
    deployment.start_agent("spare")
    deployment.wait_online(["spare"])
    revoked = deployment.call("RevokeNode", pb.RevokeNodeRequest(enterprise="spare"))
    assert revoked.status == "revoked"
    deadline = time.monotonic() + 60
    while not all(
        "the coordinator refused to activate this node" in deployment.log(n)
        for n in ("intruder", "spare")
    ):
        assert time.monotonic() < deadline, deployment.log("spare")[-2000:]
        time.sleep(0.5)
    nodes = {
        n.enterprise: n
        for n in deployment.call("ListNodes", pb.ListNodesRequest(include_revoked=True)).nodes
    }
    assert (
        "intruder" not in nodes and not nodes["spare"].online and nodes["spare"].status == "revoked"
    )
    with pytest.raises(grpc.RpcError) as err:
        deployment.register("spare")  # the same key can never come back
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for name in ("intruder", "spare"):
        deployment.stop_agent(name)


def _malformed_requests(deployment) -> list[tuple[str, object, grpc.StatusCode]]:
    """100+ requests an admin (or a script) gets wrong, each with the status it must get."""
    bad, missing, exists, big = (
        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )  # fmt: skip
    start = [
        "rounds = [",
        "[federation\nrounds = 2",
        "= 3",
        "[federation]\nrounds = 2\nrounds = 3",
        '"unterminated = 1',
        "[lora]\nrank = 8",
        "[federaton]\nrounds = 2",
        "x = 1",
        "[privacy.record]\neps = 1",
        "[federation]\nrounds = true",
        '[federation]\nrounds = "3"',
        "[federation]\nrounds = 2.0",
        "[federation]\nrounds = 0",
        "[federation]\nrounds = -1",
        "[federation]\nrounds = 100001",
        "[lora]\nalpha = inf",
        "[lora]\nalpha = nan",
        "[lora]\nr = 0",
        "[lora]\nr = 1.5",
        '[lora]\ntargets = "attention"',
        '[lora]\ntargets = ["mlp"]',
        "[lora]\ntargets = []",
        "[lora]\ndropout = 1.0",
        "[train]\nlr = 0",
        "[train]\nlr = 2.0",
        "[train]\nbatch_size = 0",
        "[train]\nseq_len = 4",
        "[train]\nseq_len = 100000",
        "[train]\nlocal_steps = 1e3",
        "[federation]\nfraction_fit = 0",
        "[federation]\nfraction_fit = 1.5",
        "[federation]\nmin_fit_clients = 4",
        "[federation]\nmin_fit_clients = 0",
        "[federation]\nconnect_timeout_s = -1",
        "[federation.secure_aggregation]\nenabled = 1",
        "[federation.secure_aggregation]\nquantization_bits = 40",
        "[federation.secure_aggregation]\nreconstruction_threshold = 0",
        "[privacy.record]\nepsilon = 0",
        "[privacy.record]\nepsilon = -1",
        "[privacy.record]\nepsilon = 1\ndelta = 1",
        "[privacy.enterprise]\nepsilon = 1\ndelta = 0.9",
        '[privacy.enterprise]\nepsilon = 1\nmechanism = "exponential"',
        '[privacy.record]\nepsilon = 1\naccountant = "gdp"',
        "[privacy.enterprise]\nepsilon = 0.001",
        "[privacy.record]\nepsilon = 1\nclip = 0",
        '[database]\nurl = "sqlite:///x.db"',
        '[output]\ndir = "/tmp"',
        '[[federation.enterprises]]\nname = "acme"',
        '[[federation.enterprises]]\nname = "finance"\ndata = "/data"',
        '[[federation.enterprises]]\nname = "finance"\nledger = "x"',
        '[[federation.enterprises]]\nname = "finance"\nbudget = { record_epsilon = 1.0 }',
        '[[federation.enterprises]]\nname = "bad name"',
        '[[federation.enterprises]]\nname = "finance"\n[[federation.enterprises]]\nname = "finance"',
        '[model]\npath = "relative/dir"',
        '[model]\npath = "/no/such/model"',
        '[model]\npath = ""',
        '[evaluation]\nserver_data = "/no/file.jsonl"',
        "[federation]\nrounds = 1" + "0" * 5000,
        "a = " + "[" * 2000 + "]" * 2000,
        "[lora]\nalpha = 1e400",
    ]
    requests = [("StartRun", pb.StartRunRequest(config_toml=text), bad) for text in start]
    overrides = [
        "federation.rounds",
        "rounds=1",
        "=1",
        "federation.rounds=0",
        "lora.r=abc",
        "database.url=sqlite:///x.db",
        "output.dir=/tmp",
        "a.b.c.d.e.f=1",
        "federation.rounds=\x00",
        "train.lr=-1",
    ]
    requests += [("StartRun", pb.StartRunRequest(overrides=[o]), bad) for o in overrides]
    requests.append(("StartRun", pb.StartRunRequest(config_toml="# " + "x" * (2 << 20)), big))
    requests.append(
        ("RegisterNode", pb.RegisterNodeRequest(enterprise="x", public_key="k" * (2 << 20)), big)
    )
    requests.append(("Generate", pb.GenerateRequest(run_id=1, prompt="p" * (2 << 20)), big))
    for method, request_type in (
        ("GetRun", pb.GetRunRequest),
        ("StopRun", pb.StopRunRequest),
        ("ListRounds", pb.ListRoundsRequest),
        ("GetPrivacyLedger", pb.GetPrivacyLedgerRequest),
        ("Generate", pb.GenerateRequest),
    ):
        requests += [
            (method, request_type(run_id=run_id), missing)
            for run_id in (999, 2**31, 2**63 - 1, 2**64 - 1)
        ]
        if method != "GetPrivacyLedger":  # 0 there means "every run"
            requests.append((method, request_type(run_id=0), bad))
    key = (deployment.root / "agents" / "clinical" / "keys" / "node.pub").read_text()
    for name in (
        "",
        " ",
        "a" * 65,
        "-lead",
        "has space",
        "semi;colon",
        "ünïcode",
        "../etc",
        "x\ny",
    ):
        requests.append(
            ("RegisterNode", pb.RegisterNodeRequest(enterprise=name, public_key=key), bad)
        )
    rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 user"
    ed25519 = (
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user"
    )
    for k in (
        "",
        "garbage",
        "ssh-rsa",
        rsa,
        ed25519,
        "-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----",
        key[:40],
        key.strip() + "\x00",  # a NUL: PostgreSQL refused it (INTERNAL), SQLite cut it
        key[:30] + "\x00" + key[30:],
        key.strip() + " \x1b[31mred",
    ):
        requests.append(
            ("RegisterNode", pb.RegisterNodeRequest(enterprise="newcomer", public_key=k), bad)
        )
    requests.append(
        ("RegisterNode", pb.RegisterNodeRequest(enterprise="clinical2", public_key=key), exists)
    )  # key reused
    other = (deployment.root / "agents" / "finance" / "keys" / "node.pub").read_text()
    requests.append(
        ("RegisterNode", pb.RegisterNodeRequest(enterprise="finance", public_key=other), exists)
    )  # name taken
    requests += [
        ("RevokeNode", pb.RevokeNodeRequest(enterprise=n), missing) for n in ("nobody", "spare")
    ]
    requests += [  # a bad name is named, never echoed whole (100 KB would not fit the reply)
        ("RevokeNode", pb.RevokeNodeRequest(enterprise=n), bad) for n in ("", "x" * 100_000)
    ]
    return requests


def test_malformed_admin_requests_get_clear_errors_and_change_nothing(deployment):
    store = RunStore(deployment.database_url, migrate=False)
    before = (
        [(r.id, r.status) for r in store.runs()],
        [(n.enterprise, n.revoked_at) for n in store.nodes(include_revoked=True)],
    )
    requests = _malformed_requests(deployment)
    assert len(requests) >= 100
    for method, request, code in requests:
        with pytest.raises(grpc.RpcError) as err:
            deployment.call(method, request)
        assert err.value.code() == code, (method, str(request)[:200], err.value.details())
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert "Traceback" not in err.value.details() and len(err.value.details()) < 5000
    # Bytes that are no protobuf at all: named as such, never an INTERNAL error.
    for method in ("StartRun", "RegisterNode", "WatchRun"):
        raw = deployment._channel.unary_unary(f"/fedmoe.admin.v1.Admin/{method}")
        for data in (b"\xff\xff\xff\xff", b"\x0a\xff", b"\x08" + b"\xff" * 11):
            with pytest.raises(grpc.RpcError) as err:
                raw(data, metadata=deployment.metadata, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, data)
            assert "not a valid" in err.value.details()
    after = (
        [(r.id, r.status) for r in store.runs()],
        [(n.enterprise, n.revoked_at) for n in store.nodes(include_revoked=True)],
    )
    assert after == before
    # A field-level error names the field.
    with pytest.raises(grpc.RpcError) as err:
        deployment.start_run("[federation]\nrounds = 0\n")
    assert "federation.rounds" in err.value.details()
    # Storage that cannot take a checkpoint: refused before a run exists (none is charged).
    runs = deployment.root / "state" / "runs"
    runs.mkdir(exist_ok=True)
    runs.rename(runs.with_name("runs.aside"))
    runs.write_text("not a folder\n")
    try:
        with pytest.raises(grpc.RpcError) as err:
            deployment.start_run(PRIVATE)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "storage.dir: cannot write to" in err.value.details()
    finally:
        runs.unlink()
        runs.with_name("runs.aside").rename(runs)
    assert [(r.id, r.status) for r in store.runs()] == before[0]


def test_a_coordinator_killed_between_rounds_and_inside_one_resumes_and_charges_no_node_twice(
    deployment,
):
    # finance's budget is spent by now: the private run goes on with the other two. A SecAgg+
    # release never goes into a second session, so a round the nodes had already drawn for is
    # lost on resume (refused, their charge stands): the run may go past such rounds.
    overrides = ("federation.rounds=3", "federation.max_failed_rounds=2")
    run = deployment.start_run(PRIVATE, overrides=overrides)
    uid = _uid(deployment, run.id)
    clinical = PrivacyLedger(deployment.root / "agents" / "clinical" / "state" / "ledger.sqlite")
    deployment.wait_for_round(run.id, 1)
    deployment.stop_coordinator(kill=True)  # between rounds (or early in round 2)
    deployment.start_coordinator()
    # Inside a round: once the nodes have charged round 3 (write-ahead, before training) and
    # before the coordinator has committed it.
    deadline = time.monotonic() + 300
    while not any(key.startswith(uid) and r == 3 for key, r, *_ in clinical.entries()):
        assert time.monotonic() < deadline, "round 3 never started"
        time.sleep(0.1)
    deployment.stop_coordinator(kill=True)
    deployment.start_coordinator()
    final = deployment.wait_for(run.id, ("completed", "failed", "budget_spent"), timeout=400)
    assert final.status == "completed", final.error
    assert final.resumes >= 2
    rounds = RunStore(deployment.database_url, migrate=False).rounds(run.id)
    assert [r.number for r in rounds] == [1, 2, 3] and rounds[0].status == "completed"
    assert rounds[2].status == "failed"  # drawn in the killed session: not sent into another
    for name in ("clinical", "manufacturing"):
        ledger = PrivacyLedger(deployment.root / "agents" / name / "state" / "ledger.sqlite")
        charged = [(r, level) for key, r, level, *_ in ledger.entries() if key.startswith(uid)]
        assert len(charged) == len(set(charged)) == 6, charged  # 3 rounds x 2 levels, each once


def test_a_killed_agent_does_not_stop_the_run(deployment):
    run = deployment.start_run(
        overrides=("federation.rounds=3", "federation.round_timeout_s=60.0", *QUICK)
    )
    deployment.wait_for_round(run.id, 1)
    deployment.stop_agent("clinical", kill=True)  # the machine dies: no goodbye to the coordinator
    final = deployment.wait_for(run.id, ("completed", "failed"))
    assert (
        final.status == "completed" and "clinical" in final.error
    )  # completed, and says who was lost
    rounds = RunStore(deployment.database_url, migrate=False).rounds(run.id)
    assert [r.number for r in rounds] == [1, 2, 3]
    clinical = [
        next((p for p in r.participations if p.enterprise == "clinical"), None) for r in rounds
    ]
    assert clinical[0].status == "ok" and clinical[1].status == "failed"  # lost mid-round 2
    assert clinical[2] is None or clinical[2].status != "ok"  # and not waited for afterwards


def _uid(deployment, run_id: int) -> str:
    return RunStore(deployment.database_url, migrate=False).run(run_id).uid

"""`fedmoe admin ...`: the admin API's command line (a gRPC client over proto/fedmoe/proto/admin.proto).

Where the coordinator is and how to authenticate: `--address`, `--ca` (the CA that signed the
coordinator's certificate) and the token from `--token-file` or FEDMOE_ADMIN_TOKEN; the address
and CA also from FEDMOE_ADMIN_ADDRESS and FEDMOE_ADMIN_CA.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from fedmoe.cli.common import UsageError, add_set_arg, console, positive_int
from fedmoe.cli.tables import (
    nodes_table,
    participation_table,
    privacy_tables,
    rounds_table,
    runs_table,
)
from fedmoe.proto import admin_pb2 as pb
from fedmoe.proto import admin_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:9091"


class AdminCallFailed(RuntimeError):
    """The coordinator answered with an error; printed as `error: CODE: message`."""


def _stub(args) -> tuple[pb_grpc.AdminStub, list]:
    token = os.environ.get("FEDMOE_ADMIN_TOKEN", "")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as err:
            raise UsageError(f"--token-file {args.token_file}: {err.strerror}") from None
    if not token:
        raise UsageError("no admin token: pass --token-file FILE or set FEDMOE_ADMIN_TOKEN")
    if not args.ca:
        raise UsageError(
            "no CA certificate: pass --ca FILE (the coordinator's CA, e.g. certs/ca.pem) or set FEDMOE_ADMIN_CA"
        )
    try:
        ca = Path(args.ca).read_bytes()
    except OSError as err:
        raise UsageError(f"--ca {args.ca}: {err.strerror}") from None
    channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root_certificates=ca))
    return pb_grpc.AdminStub(channel), [("authorization", f"Bearer {token}")]


def _call(args, method: str, request):
    stub, metadata = _stub(args)
    try:
        return getattr(stub, method)(request, metadata=metadata, timeout=args.timeout)
    except grpc.RpcError as err:
        raise AdminCallFailed(f"{err.code().name}: {err.details()}") from None


def describe_round(run: pb.Run, r: pb.Round) -> str:
    def fmt(message, name):
        return f"{getattr(message, name):.4f}" if message.HasField(name) else "-"

    line = (
        f"round {r.number}/{run.planned_rounds} {r.status} | clients {r.participants}/{r.participants + r.failures} "
        f"| train loss {fmt(r, 'train_loss')} | eval loss {fmt(r, 'eval_loss')} | server eval {fmt(r, 'server_eval_loss')}"
    )
    for level in ("record", "enterprise"):
        spent = [
            getattr(p, f"epsilon_{level}")
            for p in r.participations
            if p.HasField(f"epsilon_{level}")
        ]
        if spent:
            line += f" | eps {level} {max(spent):.3f}"
    refused = sum(p.status == "refused" for p in r.participations)
    return line + (f" | refused {refused}" if refused else "")


def watch(args, run_id: int) -> int:
    """Print round events as they commit, then the run's outcome; exit 0 only if it completed."""
    stub, metadata = _stub(args)
    run = None
    try:
        for event in stub.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=metadata):
            run = event.run
            if event.HasField("round"):
                console.print(
                    f"[fedmoe] run {run.id} {describe_round(run, event.round)}", highlight=False
                )
            else:
                console.print(
                    f"[fedmoe] run {run.id} {run.status}" + (f": {run.error}" if run.error else ""),
                    highlight=False,
                )
    except grpc.RpcError as err:
        raise AdminCallFailed(f"{err.code().name}: {err.details()}") from None
    return 0 if run is not None and run.status in ("completed", "budget_spent") else 1


def cmd_start(args) -> int:
    text = ""
    if args.config:
        try:
            text = Path(args.config).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--config {args.config}: {err}") from None
    run = _call(args, "StartRun", pb.StartRunRequest(config_toml=text, overrides=args.set))
    console.print(
        f"run {run.id} {run.status}: {len(run.enterprises)} enterprises ({', '.join(run.enterprises)}), {run.planned_rounds} rounds"
    )
    console.print(run.privacy, highlight=False)
    return watch(args, run.id) if args.watch else 0


def cmd_stop(args) -> int:
    run = _call(args, "StopRun", pb.StopRunRequest(run_id=args.run_id))
    console.print(f"run {run.id} {run.status}: {run.error}")
    return 0


def cmd_watch(args) -> int:
    return watch(args, args.run_id)


def cmd_runs(args) -> int:
    console.print(
        runs_table(
            list(_call(args, "ListRuns", pb.ListRunsRequest()).runs), f"runs on {args.address}"
        )
    )
    return 0


def cmd_run(args) -> int:
    run = _call(args, "GetRun", pb.GetRunRequest(run_id=args.run_id))
    console.print(runs_table([run], f"run {run.id}"))
    console.print(run.privacy, highlight=False)
    return 0


def cmd_rounds(args) -> int:
    rounds = list(_call(args, "ListRounds", pb.ListRoundsRequest(run_id=args.run_id)).rounds)
    console.print(rounds_table(args.run_id, rounds))
    if args.clients:
        console.print(participation_table(rounds))
    return 0


def cmd_ledger(args) -> int:
    ledger = _call(args, "GetPrivacyLedger", pb.GetPrivacyLedgerRequest(run_id=args.run_id or 0))
    for table in privacy_tables(ledger, args.rounds):
        console.print(table)
    return 0


def cmd_register(args) -> int:
    try:
        key = Path(args.public_key).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--public-key {args.public_key}: {err}") from None
    node = _call(
        args, "RegisterNode", pb.RegisterNodeRequest(enterprise=args.enterprise, public_key=key)
    )
    console.print(
        f"registered {node.enterprise}: key {node.fingerprint}, Flower node {node.flower_node_id}"
    )
    return 0


def cmd_revoke(args) -> int:
    node = _call(args, "RevokeNode", pb.RevokeNodeRequest(enterprise=args.enterprise))
    console.print(f"revoked {node.enterprise}: key {node.fingerprint} can never connect again")
    return 0


def cmd_nodes(args) -> int:
    console.print(
        nodes_table(
            list(_call(args, "ListNodes", pb.ListNodesRequest(include_revoked=args.all)).nodes)
        )
    )
    return 0


def add_commands(sub) -> None:
    admin = sub.add_parser(
        "admin", help="the coordinator's admin API: runs, rounds, privacy ledger, enterprise nodes"
    )
    admin.add_argument(
        "--address",
        default=os.environ.get("FEDMOE_ADMIN_ADDRESS", DEFAULT_ADDRESS),
        help="host:port of the admin API",
    )
    admin.add_argument(
        "--ca",
        default=os.environ.get("FEDMOE_ADMIN_CA"),
        help="CA certificate that signed the coordinator's (PEM)",
    )
    admin.add_argument(
        "--token-file", help="file holding your admin token (default: $FEDMOE_ADMIN_TOKEN)"
    )
    admin.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for an answer")
    cmds = admin.add_subparsers(dest="admin_command", required=True)

    p = cmds.add_parser("start", help="start a run from a run config (TOML)")
    p.add_argument(
        "--config",
        type=Path,
        help="run config (default: all defaults, every registered enterprise)",
    )
    add_set_arg(p)
    p.add_argument("--watch", action="store_true", help="then follow the run until it ends")
    p.set_defaults(func=cmd_start)

    p = cmds.add_parser("stop", help="stop a run")
    p.add_argument("run_id", type=positive_int)
    p.set_defaults(func=cmd_stop)

    p = cmds.add_parser("watch", help="follow a run's rounds as they commit")
    p.add_argument("run_id", type=positive_int)
    p.set_defaults(func=cmd_watch)

    cmds.add_parser("runs", help="list runs").set_defaults(func=cmd_runs)

    p = cmds.add_parser("run", help="show one run")
    p.add_argument("run_id", type=positive_int)
    p.set_defaults(func=cmd_run)

    p = cmds.add_parser("rounds", help="a run's rounds")
    p.add_argument("run_id", type=positive_int)
    p.add_argument("--clients", action="store_true", help="also each enterprise's participation")
    p.set_defaults(func=cmd_rounds)

    p = cmds.add_parser(
        "ledger", help="the privacy ledger: epsilon spent per run, enterprise and round"
    )
    p.add_argument("run_id", type=positive_int, nargs="?")
    p.add_argument("--rounds", action="store_true", help="also every round")
    p.set_defaults(func=cmd_ledger)

    nodes = cmds.add_parser("nodes", help="enterprise nodes: register, revoke, list")
    node_cmds = nodes.add_subparsers(dest="nodes_command", required=True)
    p = node_cmds.add_parser("register", help="bind an enterprise name to a node's public key")
    p.add_argument("enterprise")
    p.add_argument(
        "--public-key", required=True, help="the node's node.pub (from `fedmoe agent init`)"
    )
    p.set_defaults(func=cmd_register)
    p = node_cmds.add_parser(
        "revoke", help="revoke an enterprise's key: its node is cut off for good"
    )
    p.add_argument("enterprise")
    p.set_defaults(func=cmd_revoke)
    p = node_cmds.add_parser(
        "list", help="registered enterprises, and whether their node is online"
    )
    p.add_argument("--all", action="store_true", help="include revoked keys")
    p.set_defaults(func=cmd_nodes)

"""`fedmoe admin ...`: the admin API's command line (a gRPC client over proto/fedmoe/proto/admin.proto).

Where the coordinator is and how to authenticate: `--address`, `--ca` (the CA that signed the
coordinator's certificate) and the token from `--token-file` or FEDMOE_ADMIN_TOKEN; the address
and CA also from FEDMOE_ADMIN_ADDRESS and FEDMOE_ADMIN_CA.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import grpc
from rich.markup import escape

from fedmoe.cli.common import (
    UsageError,
    add_json_arg,
    add_set_arg,
    console,
    error_console,
    positive_float,
    positive_int,
)
from fedmoe.cli.tables import (
    node_rows,
    print_nodes,
    print_privacy,
    print_rounds,
    print_runs,
    privacy_rows,
    round_row,
    round_rows,
    run_rows,
)
from fedmoe.proto import admin_pb2 as pb
from fedmoe.proto import admin_pb2_grpc as pb_grpc
from fedmoe.support.words import plural

DEFAULT_ADDRESS = "127.0.0.1:9091"
DEFAULT_TIMEOUT_S = 120.0  # a call's deadline; exports and watching have none unless --timeout


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
        return getattr(stub, method)(
            request, metadata=metadata, timeout=args.timeout or DEFAULT_TIMEOUT_S
        )
    except grpc.RpcError as err:
        raise AdminCallFailed(f"{err.code().name}: {err.details()}") from None


def describe_round(run: pb.Run, r: pb.Round) -> str:
    """One line per committed round, as `fedmoe run` prints it (same fields, same precision)."""
    row = round_row(r)

    def fmt(value):
        return "-" if value is None else f"{value:.4f}"

    line = (
        f"round {r.number}/{run.planned_rounds} {r.status} | clients {r.participants}/{r.participants + r.failures} "
        f"| train loss {fmt(row['train_loss'])} | eval loss {fmt(row['eval_loss'])} "
        f"| server eval {fmt(row['server_eval_loss'])}"
    )
    for level in ("record", "enterprise"):
        spent = [p[f"epsilon_{level}"] for p in row["participations"]]
        spent = [e for e in spent if e is not None]
        if spent:
            line += f" | eps {level} {max(spent):.3f}"
    refused = sum(p["status"] == "refused" for p in row["participations"])
    failed = [
        p["enterprise"] or p["node_id"]
        for p in row["participations"]
        if p["status"] in ("failed", "rejected")
    ]
    line += f" | refused {refused}" if refused else ""
    line += f" | FAILED {', '.join(failed)}" if failed else ""
    return line + ("" if row["duration_s"] is None else f" | {row['duration_s']:.1f}s")


def watch(args, run_id: int) -> int:
    """Print round events as they commit, then the run's outcome; exit 0 only if it completed."""
    stub, metadata = _stub(args)
    run = None
    try:
        for event in stub.WatchRun(
            pb.WatchRunRequest(run_id=run_id), metadata=metadata, timeout=args.timeout
        ):
            run = event.run
            if event.HasField("round"):
                console.print(
                    f"[fedmoe] run {run.id} {describe_round(run, event.round)}",
                    highlight=False,
                    markup=False,
                )
            else:
                console.print(
                    f"[fedmoe] run {run.id} {run.status}" + (f": {run.error}" if run.error else ""),
                    highlight=False,
                    markup=False,
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
        f"run {run.id} {run.status}: {plural(len(run.enterprises), 'enterprise')} "
        f"({', '.join(run.enterprises)}), {plural(run.planned_rounds, 'round')}",
        highlight=False,
        markup=False,
    )
    console.print(run.privacy, highlight=False, markup=False)
    return watch(args, run.id) if args.watch else 0


def cmd_stop(args) -> int:
    run = _call(args, "StopRun", pb.StopRunRequest(run_id=args.run_id))
    console.print(f"run {run.id} {run.status}: {run.error}", highlight=False, markup=False)
    return 0


def cmd_watch(args) -> int:
    return watch(args, args.run_id)


def cmd_runs(args) -> int:
    runs = list(_call(args, "ListRuns", pb.ListRunsRequest()).runs)
    print_runs(args, run_rows(runs), f"runs on {args.address}")
    return 0


def cmd_run(args) -> int:
    run = _call(args, "GetRun", pb.GetRunRequest(run_id=args.run_id))
    print_runs(args, run_rows([run]), f"run {run.id}")
    if not args.json:
        console.print(run.privacy, highlight=False, markup=False)
    return 0


def cmd_rounds(args) -> int:
    rounds = list(_call(args, "ListRounds", pb.ListRoundsRequest(run_id=args.run_id)).rounds)
    print_rounds(args, args.run_id, round_rows(rounds))
    return 0


def cmd_ledger(args) -> int:
    ledger = _call(args, "GetPrivacyLedger", pb.GetPrivacyLedgerRequest(run_id=args.run_id or 0))
    print_privacy(args, privacy_rows(ledger))
    return 0


def cmd_generate(args) -> int:
    if not -(2**63) <= args.seed < 2**63:
        raise UsageError(f"--seed: must fit in 64 bits (got {args.seed})")
    request = pb.GenerateRequest(
        run_id=args.run_id,
        round=args.round or 0,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    reply = _call(args, "Generate", request)
    if reply.note:
        error_console.print(f"note: {reply.note}", highlight=False, markup=False)
    console.print(f"[bold]{escape(args.prompt)}[/bold]{escape(reply.text)}", highlight=False)
    return 0


def _export_path(out: Path, name: str) -> Path:
    """Where a file the coordinator names lands: inside `out`, whatever the name says."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise AdminCallFailed(f"the coordinator sent a file named {name!r}; nothing was kept")
    return out.joinpath(*parts)


def _receive_export(stream, folder: Path) -> pb.ExportManifest:
    """Write an ExportRun stream into `folder`; every file must match the manifest's size and
    SHA-256, and nothing may land outside `folder`."""
    manifest, expected, digests, sizes, handle, current = None, {}, {}, {}, None, None
    try:
        for message in stream:
            if message.HasField("manifest"):
                manifest = message.manifest
                expected = {f.path: f for f in manifest.files}
                continue
            path = message.chunk.path
            if path not in expected or (path in digests and path != current):
                raise AdminCallFailed(f"the coordinator sent {path!r} outside its manifest order")
            if path != current:  # the next file
                if handle is not None:
                    handle.close()
                current, target = path, _export_path(folder, path)
                target.parent.mkdir(parents=True, exist_ok=True)
                handle = open(target, "xb")
                digests[path], sizes[path] = hashlib.sha256(), 0
            handle.write(message.chunk.data)
            digests[path].update(message.chunk.data)
            sizes[path] += len(message.chunk.data)
    finally:
        if handle is not None:
            handle.close()
    if manifest is None:
        raise AdminCallFailed("the coordinator ended the export before sending anything")
    for f in manifest.files:
        if f.size == 0 and f.path not in digests:  # an empty file comes without a chunk
            target = _export_path(folder, f.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
            digests[f.path], sizes[f.path] = hashlib.sha256(), 0
        if sizes.get(f.path) != f.size or digests[f.path].hexdigest() != f.sha256:
            raise AdminCallFailed(
                f"{f.path}: received {sizes.get(f.path, 0):,} of {f.size:,} bytes or a "
                "different SHA-256; nothing was kept"
            )
    return manifest


def cmd_export(args) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} is not empty; choose a new folder")
    fmt = "merged" if args.merge else "checkpoint" if args.checkpoint else "peft"
    stub, metadata = _stub(args)
    request = pb.ExportRunRequest(run_id=args.run_id, round=args.round or 0, format=fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside --out and renamed into place when every file checks out: never half an export.
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = _receive_export(
            stub.ExportRun(request, metadata=metadata, timeout=args.timeout), partial
        )
        if out.exists():
            out.rmdir()  # empty, checked above
        partial.rename(out)
    except grpc.RpcError as err:
        raise AdminCallFailed(f"{err.code().name}: {err.details()}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    what = {
        "peft": "peft adapter (PeftModel.from_pretrained loads it)",
        "merged": "merged model",
        "checkpoint": "fedmoe checkpoint (`fedmoe generate --adapter DIR` reads it)",
    }[fmt]
    console.print(
        f"wrote run {manifest.run_id} round {manifest.round}'s {what} to {out} "
        f"({len(manifest.files)} files, {manifest.total_bytes:,} bytes; base model "
        f"{manifest.base_model} on the coordinator)",
        highlight=False,
        markup=False,
    )
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
    console.print(
        f"revoked {node.enterprise}: key {node.fingerprint} can never connect again",
        highlight=False,
        markup=False,
    )
    return 0


def cmd_nodes(args) -> int:
    nodes = list(_call(args, "ListNodes", pb.ListNodesRequest(include_revoked=args.all)).nodes)
    print_nodes(args, node_rows(nodes))
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
    admin.add_argument(
        "--timeout",
        type=positive_float,
        help=f"seconds to wait for an answer (default {DEFAULT_TIMEOUT_S:g}; "
        "none for export and watch)",
    )
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

    p = cmds.add_parser("runs", help="list runs")
    add_json_arg(p)
    p.set_defaults(func=cmd_runs)

    p = cmds.add_parser("run", help="show one run")
    p.add_argument("run_id", type=positive_int)
    add_json_arg(p)
    p.set_defaults(func=cmd_run)

    p = cmds.add_parser("rounds", help="a run's rounds")
    p.add_argument("run_id", type=positive_int)
    p.add_argument("--clients", action="store_true", help="also each enterprise's participation")
    add_json_arg(p)
    p.set_defaults(func=cmd_rounds)

    p = cmds.add_parser(
        "ledger", help="the privacy ledger: epsilon spent per run, enterprise and round"
    )
    p.add_argument("run_id", type=positive_int, nargs="?")
    p.add_argument("--rounds", action="store_true", help="also every round")
    add_json_arg(p)
    p.set_defaults(func=cmd_ledger)

    p = cmds.add_parser(
        "export",
        help="download a run's adapter as `fedmoe export` writes it (a plain peft adapter, "
        "checked by logits; --merge: a merged model), built on the coordinator (exports over "
        "its admin.max_export_bytes, default 4 GiB, are refused)",
    )
    p.add_argument("run_id", type=positive_int)
    p.add_argument(
        "--round", type=positive_int, help="this round's adapter (default: the run's result)"
    )
    p.add_argument("--out", required=True, help="a new or empty folder")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--merge", action="store_true", help="fold the adapter into the base weights")
    kind.add_argument(
        "--checkpoint",
        action="store_true",
        help="the round's checkpoint as the coordinator keeps it (fedmoe's own format)",
    )
    p.set_defaults(func=cmd_export)

    p = cmds.add_parser(
        "generate", help="sample text from the base model + a run's adapter, on the coordinator"
    )
    p.add_argument("run_id", type=positive_int)
    p.add_argument(
        "--round", type=positive_int, help="this round's adapter (default: the run's result)"
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="1-1024 (default 48)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding; <= 10")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

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
    add_json_arg(p)
    p.set_defaults(func=cmd_nodes)

"""`fedmoe`: the command line. Thin: parse, validate, call a function, print."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from rich.console import Console
from rich.table import Table

# Tables stay readable when piped (rich would wrap them at 80 columns).
console = Console(width=None if sys.stdout.isatty() else 200)
DEFAULT_DB = "sqlite:///runs/fedmoe.db"


def _parse_overrides(pairs: list[str]) -> dict:
    """`section.key=value` pairs; values are TOML literals, bare words are strings."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {pair!r}: use section.key=value, e.g. --set federation.rounds=5")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


def cmd_run(args) -> int:
    from fedmoe.coordinator.config import load_run_config
    from fedmoe.coordinator.launcher import launch

    config = load_run_config(args.config, _parse_overrides(args.set))
    return launch(config, verbose=args.verbose, superlink=args.superlink)


def _store(args):
    from fedmoe.coordinator.db import RunStore

    return RunStore(args.database)


def cmd_runs(args) -> int:
    store = _store(args)
    table = Table(title=f"runs in {args.database}")
    for col in ("run", "status", "rounds", "started", "ended", "base", "error"):
        table.add_column(col)
    for run in store.runs():
        done = len([r for r in store.rounds(run.id) if r.status == "completed"])
        table.add_row(
            str(run.id),
            run.status,
            f"{done}/{run.planned_rounds}",
            f"{run.started_at:%Y-%m-%d %H:%M:%S}",
            f"{run.ended_at:%H:%M:%S}" if run.ended_at else "-",
            (run.base_fingerprint or "-")[:12],
            (run.error or "")[:60],
        )
    console.print(table)
    return 0


def _load_imbalance(expert_load: dict | None) -> str:
    """Per MoE layer, the busiest expert's token count over the mean: 1.0 is perfectly balanced."""
    if not expert_load:
        return "-"
    return " ".join(f"L{layer}:{max(c) / (sum(c) / len(c)):.2f}" for layer, c in sorted(expert_load.items(), key=lambda kv: int(kv[0])) if sum(c))


def cmd_rounds(args) -> int:
    store = _store(args)
    if store.run(args.run_id) is None:
        raise SystemExit(f"error: run {args.run_id} not found in {args.database}; `fedmoe runs` lists the runs")

    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    table = Table(title=f"run {args.run_id}")
    for col in ("round", "status", "clients", "train loss", "eval loss", "server eval", "update norm", "KiB up", "KiB down", "expert load max/mean", "seconds"):
        table.add_column(col)
    for r in store.rounds(args.run_id):
        table.add_row(
            str(r.number),
            r.status,
            f"{r.participants}/{r.participants + r.failures}",
            fmt(r.train_loss),
            fmt(r.eval_loss),
            fmt(r.server_eval_loss),
            fmt(r.update_norm),
            f"{r.bytes_up / 1024:.0f}",
            f"{r.bytes_down / 1024:.0f}",
            _load_imbalance(r.expert_load),
            f"{(r.ended_at - r.started_at).total_seconds():.1f}",
        )
    console.print(table)
    if args.clients:
        clients = Table(title="participation")
        for col in ("round", "enterprise", "node", "status", "examples", "train loss", "held-out before", "held-out after", "update norm", "seconds", "error"):
            clients.add_column(col)
        for r in store.rounds(args.run_id):
            for p in r.participations:
                clients.add_row(
                    str(r.number), p.enterprise or "-", p.node_id[:10], p.status, str(p.num_examples or "-"), fmt(p.train_loss),
                    fmt(p.heldout_loss_before), fmt(p.eval_loss), fmt(p.update_norm), fmt(p.duration_s), (p.error or "")[:50],
                )
        console.print(clients)
    return 0


def _eps(x) -> str:
    return "off" if x is None else f"{x:.3f}"


def cmd_privacy(args) -> int:
    """The privacy ledger: the coordinator's record per run, or a node's own ledger file."""
    if args.node_ledger:
        from fedmoe.client.ledger import PrivacyLedger

        if not args.node_ledger.is_file():
            raise SystemExit(f"error: no node ledger at {args.node_ledger}")
        ledger = PrivacyLedger(args.node_ledger)
        table = Table(title=f"node ledger {args.node_ledger}")
        for col in ("run", "round", "level", "run epsilon after", "delta", "recorded"):
            table.add_column(col)
        for run, number, level, eps, delta, at in ledger.entries():
            table.add_row(run, str(number), level, "inf (no guarantee)" if eps == float("inf") else f"{eps:.3f}", f"{delta:g}", at[:19])
        console.print(table)
        console.print(f"lifetime epsilon: record {ledger.lifetime('record'):.3f}, enterprise {ledger.lifetime('enterprise'):.3f}")
        return 0
    store = _store(args)
    if args.run_id is not None and store.run(args.run_id) is None:
        raise SystemExit(f"error: run {args.run_id} not found in {args.database}; `fedmoe runs` lists the runs")
    rows = store.privacy_ledger(args.run_id)
    runs = Table(title="privacy per run (epsilon per enterprise: spent / target)")
    for col in ("run", "status", "record level", "enterprise level", "secure agg", "enterprise", "record eps", "enterprise eps", "rounds in"):
        runs.add_column(col)
    spent: dict[tuple[int, str], dict] = {}
    plans = {}
    for run, _, p in rows:
        plans[run.id] = (run.status, run.privacy_plan or {})
        entry = spent.setdefault((run.id, p.enterprise or p.node_id), {"record": None, "enterprise": None, "rounds": 0})
        if p.status == "refused":
            continue
        entry["rounds"] += 1  # charged: it accepted the round, so its update may have been released
        for level in ("record", "enterprise"):
            eps = getattr(p, f"epsilon_{level}")
            if eps is not None:
                entry[level] = max(entry[level] or 0.0, eps)
    for (run_id, enterprise), entry in spent.items():
        status, plan = plans[run_id]
        record, entp = plan.get("record"), plan.get("enterprise")
        runs.add_row(
            str(run_id), status,
            f"eps {record['epsilon']:g} delta {record['delta']:g}" if record else "off",
            f"{entp['mechanism']} eps {entp['epsilon']:g}" if entp else "off",
            "on" if plan.get("secure_aggregation") else "off",
            enterprise,
            f"{_eps(entry['record'])} / {record['epsilon']:g}" if record else "off",
            f"{_eps(entry['enterprise'])} / {entp['epsilon']:g}" if entp else "off",
            str(entry["rounds"]),
        )
    console.print(runs)
    if args.rounds:
        table = Table(title="privacy per round (the run's epsilon after the round)")
        for col in ("run", "round", "enterprise", "status", "record eps", "enterprise eps", "note"):
            table.add_column(col)
        for run, rnd, p in rows:
            table.add_row(str(run.id), str(rnd.number), p.enterprise or p.node_id, p.status, _eps(p.epsilon_record), _eps(p.epsilon_enterprise), (p.error or "")[:80])
        console.print(table)
    return 0


def _resolve_adapter(args) -> tuple[Path | None, str]:
    from fedmoe.coordinator.artifacts import adapter_of_run

    if args.adapter:
        return Path(args.adapter), args.model
    if args.run is None:
        return None, args.model
    return adapter_of_run(_store(args), args.run, args.round)


def cmd_generate(args) -> int:
    from fedmoe.coordinator.artifacts import generate

    adapter, model_path = _resolve_adapter(args)
    text = generate(model_path, adapter, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    console.print(f"[bold]{args.prompt}[/bold]{text}", highlight=False)
    return 0


def cmd_export(args) -> int:
    from fedmoe.coordinator.artifacts import export

    adapter, model_path = _resolve_adapter(args)
    if adapter is None:
        raise SystemExit("error: name the adapter with --run RUN_ID or --adapter DIR")
    export(model_path, adapter, Path(args.out), merge=args.merge)
    console.print(f"wrote {'merged model' if args.merge else 'adapter'} to {args.out}")
    return 0


def cmd_pretrain(args) -> int:
    from fedmoe.model.base import EMBEDDED_BASE_DIR
    from fedmoe.model.pretrain import pretrain

    pretrain(Path(args.out) if args.out else EMBEDDED_BASE_DIR, steps=args.steps, log=console.print)
    return 0


def cmd_build_demo_data(args) -> int:
    from fedmoe.model.corpus import DEMO_DATA_DIR, build_demo_federation

    out = Path(args.out) if args.out else DEMO_DATA_DIR
    build_demo_federation(out)
    console.print(f"wrote the demo federation to {out}")
    return 0


def cmd_split(args) -> int:
    from fedmoe.model.corpus import write_jsonl
    from fedmoe.model.data import dirichlet_partition, read_records

    records = read_records(Path(args.input))
    missing = [i for i, r in enumerate(records) if args.label not in r]
    if missing:
        raise SystemExit(f"error: --label {args.label!r} missing in record {missing[0]} of {args.input}")
    parts = dirichlet_partition([str(r[args.label]) for r in records], args.clients, args.alpha, args.seed)
    for i, idx in enumerate(parts):
        chosen = [records[j] for j in idx]
        cut = max(1, int(len(chosen) * (1 - args.heldout))) if chosen else 0
        write_jsonl(chosen[:cut], Path(args.out) / f"enterprise-{i}" / "train.jsonl")
        write_jsonl(chosen[cut:], Path(args.out) / f"enterprise-{i}" / "heldout.jsonl")
        console.print(f"enterprise-{i}: {len(chosen)} records")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmoe", description="Federated LoRA fine-tuning of DeepSeek-style MoE models (differential privacy: see privacy/README.md).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a federated fine-tune (default: embedded base + demo federation)")
    p.add_argument("--config", type=Path, help="run config TOML (see README); default: built-in defaults")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    p.add_argument("--verbose", action="store_true", help="show Flower's own log lines too")
    p.add_argument(
        "--superlink", metavar="HOST:PORT",
        help="submit to this deployment-engine SuperLink (run on its host; enterprises = the SuperNodes) instead of simulating",
    )
    p.set_defaults(func=cmd_run)

    def with_db(p):
        p.add_argument("--database", default=DEFAULT_DB, help=f"SQLAlchemy URL of the run database (default {DEFAULT_DB})")

    p = sub.add_parser("runs", help="list runs")
    with_db(p)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("rounds", help="list the rounds of a run")
    p.add_argument("run_id", type=_positive_int)
    p.add_argument("--clients", action="store_true", help="also list each client's participation")
    with_db(p)
    p.set_defaults(func=cmd_rounds)

    def with_adapter(p):
        with_db(p)
        p.add_argument("--run", type=_positive_int, help="use this run's adapter (last completed round unless --round)")
        p.add_argument("--round", type=_positive_int, help="round of --run")
        p.add_argument("--adapter", help="adapter directory (instead of --run)")
        p.add_argument("--model", default="embedded", help='base model with --adapter: "embedded" or a local checkpoint dir')

    p = sub.add_parser("privacy", help="the privacy ledger: epsilon spent per run, enterprise and round")
    p.add_argument("run_id", type=int, nargs="?", help="one run (default: all)")
    p.add_argument("--rounds", action="store_true", help="also list every round of every enterprise")
    p.add_argument("--node-ledger", type=Path, metavar="FILE", help="show a node's own ledger (the agent's SQLite file) instead")
    with_db(p)
    p.set_defaults(func=cmd_privacy)

    p = sub.add_parser("generate", help="sample text from base + adapter")
    with_adapter(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_positive_int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write the adapter, or with --merge a merged standalone model")
    with_adapter(p)
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("pretrain", help="rebuild the embedded base model and tokenizer from our corpus")
    p.add_argument("--out", help="output directory (default: the embedded base inside the package)")
    p.add_argument("--steps", type=_positive_int, default=1500)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("build-demo-data", help="regenerate the demo federation's data files")
    p.add_argument("--out", help="output directory (default: the bundled demo data)")
    p.set_defaults(func=cmd_build_demo_data)

    p = sub.add_parser("split", help="split one dataset into N non-IID enterprises (Dirichlet over a label)")
    p.add_argument("input", help="JSONL/CSV/Parquet file")
    p.add_argument("--label", required=True, help="record field to split on, e.g. domain")
    p.add_argument("--clients", type=_positive_int, required=True)
    p.add_argument("--alpha", type=_positive_float, default=0.5, help="Dirichlet concentration; smaller is more skewed")
    p.add_argument("--heldout", type=_fraction, default=0.2, help="share of each enterprise's records held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_split)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedmoe.coordinator.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, LookupError) as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())

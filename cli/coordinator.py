"""The coordinator side's commands: simulate a run, read the run database, use a run's adapter."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from fedmoe.cli.common import (
    UsageError,
    add_database_arg,
    add_json_arg,
    add_set_arg,
    console,
    positive_int,
)
from fedmoe.cli.tables import (
    print_privacy,
    print_rounds,
    print_runs,
    privacy_rows,
    round_rows,
    run_rows,
)


def cmd_run(args) -> int:
    from fedmoe.coordinator.config import load_run_config, parse_overrides
    from fedmoe.coordinator.launcher import launch

    if args.resume is not None:
        if args.config or args.set:
            raise UsageError(
                "--resume continues a run with its own config: drop --config and --set"
            )
        return launch(None, verbose=args.verbose, resume=args.resume, database=args.database)
    config = load_run_config(args.config, parse_overrides(args.set))
    return launch(config, verbose=args.verbose)


def cmd_plan(args) -> int:
    """The run's privacy plan and utility forecast, without training (refusals raise as in run)."""
    from fedmoe.coordinator.config import check_privacy, load_run_config, parse_overrides
    from fedmoe.coordinator.store.views import describe_privacy, privacy_plan_summary
    from fedmoe.model.lora import adapter_size
    from fedmoe.support.words import plural

    config = load_run_config(args.config, parse_overrides(args.set))
    fed, train = config.federation, config.train
    console.print(
        f"{plural(len(fed.enterprises), 'enterprise')}, {plural(fed.rounds, 'round')} x "
        f"{plural(train.local_steps, 'local step')}, "
        f"{adapter_size(config.model.path, config.lora):,} trainable adapter parameters",
        highlight=False,
    )
    console.print(describe_privacy(privacy_plan_summary(config)), highlight=False)
    console.print(f"the run's result: {config.result_basis()}", highlight=False)
    for forecast in check_privacy(config):
        console.print(f"forecast, {forecast.describe()}", highlight=False)
    console.print("the plan is accepted: `fedmoe run` with the same arguments runs it")
    return 0


def cmd_audit(args) -> int:
    """`fedmoe run` with the one-run audit on (its defaults unless the config sets [privacy.audit])."""
    from fedmoe.coordinator.config import load_run_config, parse_overrides
    from fedmoe.coordinator.launcher import launch
    from fedmoe.privacy.settings import AuditSettings

    config = load_run_config(args.config, parse_overrides(args.set))
    if config.privacy.audit is None:
        privacy = config.privacy.model_copy(update={"audit": AuditSettings()})
        config = config.model_copy(update={"privacy": privacy})
    return launch(config, verbose=args.verbose)


def _store(args):
    from fedmoe.coordinator.store.db import RunStore

    return RunStore(args.database, migrate=False)


def _known_run(store, run_id: int, database: str) -> None:
    if store.run(run_id) is None:
        raise LookupError(f"run {run_id} not found in {database}; `fedmoe runs` lists the runs")


def cmd_runs(args) -> int:
    from fedmoe.coordinator.store.views import runs_response

    rows = run_rows(list(runs_response(_store(args)).runs))
    print_runs(args, rows, f"runs in {args.database}")
    return 0


def cmd_rounds(args) -> int:
    from fedmoe.coordinator.store.views import round_message

    store = _store(args)
    _known_run(store, args.run_id, args.database)
    rows = round_rows([round_message(r) for r in store.rounds(args.run_id)])
    print_rounds(args, args.run_id, rows)
    return 0


def cmd_privacy(args) -> int:
    """The coordinator's record of the epsilon spent, per run, enterprise and round."""
    from fedmoe.coordinator.store.views import privacy_ledger_message

    store = _store(args)
    if args.run_id is not None:
        _known_run(store, args.run_id, args.database)
    print_privacy(args, privacy_rows(privacy_ledger_message(store, args.run_id)))
    return 0


def cmd_report(args) -> int:
    """One self-contained HTML file of a run's page: charts, their numbers and downloads inline,
    nothing fetched (for people without access to the coordinator)."""
    from fedmoe.coordinator.store.views import privacy_ledger_message, rounds_response, run_message
    from fedmoe.coordinator.web.pages import run_page
    from fedmoe.support.words import plural

    out = args.out
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {out}: a report is one .html file")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; name the .html file to write")
    store = _store(args)
    _known_run(store, args.run_id, args.database)
    run = run_message(store.run(args.run_id), store.rounds(args.run_id))
    page = run_page(
        run,
        rounds_response(store, args.run_id),
        privacy_ledger_message(store, args.run_id),
        user=None,
        standalone=True,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(page)
    partial.replace(out)
    print(
        f"wrote {out} ({len(page) // 1024} KiB): run {run.id}, {plural(run.completed_rounds, 'round')}"
    )
    return 0


def _resolve_adapter(args) -> tuple[Path | None, str]:
    from fedmoe.coordinator.store.artifacts import adapter_of_run

    if args.adapter:
        return Path(args.adapter), args.model
    if args.run is None:
        return None, args.model
    return adapter_of_run(_store(args), args.run, args.round)


def cmd_generate(args) -> int:
    from fedmoe.coordinator.store.artifacts import generate

    adapter, model_path = _resolve_adapter(args)
    text = generate(
        model_path, adapter, args.prompt, args.max_new_tokens, args.temperature, args.seed
    )
    console.print(f"[bold]{escape(args.prompt)}[/bold]{escape(text)}", highlight=False)
    return 0


def cmd_export(args) -> int:
    from fedmoe.coordinator.store.artifacts import export

    adapter, model_path = _resolve_adapter(args)
    if adapter is None:
        raise UsageError(
            "name the adapter with --run RUN_ID or --adapter DIR"
            if args.run is None
            else f"run {args.run} has no adapter better than its base model; --round N exports one anyway"
        )
    export(model_path, adapter, Path(args.out), merge=args.merge)
    what = "merged model" if args.merge else "peft adapter (PeftModel.from_pretrained loads it)"
    console.print(f"wrote {what} to {args.out}")
    return 0


def cmd_coordinator(args) -> int:
    from fedmoe.coordinator.service.service import CoordinatorService, coordinator_health
    from fedmoe.coordinator.service.service_config import load_coordinator_config, new_admin_token

    if args.coordinator_command == "token":
        token, lines = new_admin_token(args.name)
        print(
            f"token for {args.name} (give it to them; the coordinator keeps only its hash):\n{token}\n"
        )
        print(f"add to coordinator.toml:\n{lines}", end="")
        return 0
    if args.config is None:
        raise UsageError(
            "--config coordinator.toml is required (see the README's deployment section)"
        )
    config = load_coordinator_config(args.config)
    if args.coordinator_command == "health":
        ok, message = coordinator_health(config)
        console.print(message, highlight=False)
        return 0 if ok else 1
    return CoordinatorService(config).serve_forever()


def cmd_certs(args) -> int:
    from fedmoe.coordinator.service.certs import make_dev_certificates

    try:
        paths = make_dev_certificates(Path(args.out), args.host, args.days, args.force)
    except ValueError as err:
        raise UsageError(str(err)) from None
    console.print("wrote " + ", ".join(str(p) for p in paths))
    console.print(
        f"agents and admins trust {paths[0]}; the coordinator serves {paths[2]} with {paths[3]}"
    )
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "coordinator",
        help="the coordinator service: SuperLink, agents' endpoint, admin API, run database",
    )
    p.add_argument("--config", type=Path, help="coordinator.toml")
    cmds = p.add_subparsers(dest="coordinator_command")
    t = cmds.add_parser(
        "token", help="make an admin token and the coordinator.toml lines that admit it"
    )
    t.add_argument("--name", required=True, help="who holds the token")
    h = cmds.add_parser("health", help="exit 0 if the coordinator configured by --config is up")
    h.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="coordinator.toml")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser(
        "certs", help="make a development CA and server certificate (production brings its own)"
    )
    p.add_argument(
        "--out", default="certs", help="folder for ca.pem, ca.key, server.pem, server.key"
    )
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="a host name or IP the coordinator is reached by (repeatable)",
    )
    p.add_argument("--days", type=positive_int, default=365)
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser(
        "run",
        help="run a federated fine-tune on Flower's simulation engine (default: embedded base + demo federation)",
    )
    p.add_argument(
        "--config", type=Path, help="run config TOML (see README); default: built-in defaults"
    )
    add_set_arg(p)
    p.add_argument("--verbose", action="store_true", help="show Flower's own log lines too")
    p.add_argument(
        "--resume",
        type=positive_int,
        metavar="RUN_ID",
        help="continue a run whose launcher was stopped, from its last committed round",
    )
    add_database_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "plan",
        help="print a run config's privacy plan and its utility forecast, without training "
        "(a plan `fedmoe run` would refuse is refused here, with the fixes)",
    )
    p.add_argument("--config", type=Path, help="run config TOML; default: built-in defaults")
    add_set_arg(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "audit",
        help="a run (as `fedmoe run`) with the one-run privacy audit: canaries on every node, "
        "an epsilon lower bound at the end (`fedmoe privacy` shows it)",
    )
    p.add_argument("--config", type=Path, help="run config TOML; default: built-in defaults")
    add_set_arg(p)
    p.add_argument("--verbose", action="store_true", help="show Flower's own log lines too")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("runs", help="list runs")
    add_database_arg(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("rounds", help="list the rounds of a run")
    p.add_argument("run_id", type=positive_int)
    p.add_argument("--clients", action="store_true", help="also list each client's participation")
    add_database_arg(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_rounds)

    p = sub.add_parser(
        "report", help="write one self-contained HTML file of a run's charts and numbers"
    )
    p.add_argument("run_id", type=positive_int)
    p.add_argument("--out", type=Path, required=True, help="the .html file to write")
    add_database_arg(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "privacy",
        help="the coordinator's privacy ledger: epsilon spent per run, enterprise and round",
    )
    p.add_argument("run_id", type=positive_int, nargs="?", help="one run (default: all)")
    p.add_argument(
        "--rounds", action="store_true", help="also list every round of every enterprise"
    )
    add_database_arg(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_privacy)

    def with_adapter(p):
        add_database_arg(p)
        p.add_argument(
            "--run",
            type=positive_int,
            help="use this run's result (its best round, as the run chose it) unless --round",
        )
        p.add_argument("--round", type=positive_int, help="round of --run")
        p.add_argument("--adapter", help="adapter directory (instead of --run)")
        p.add_argument(
            "--model",
            default="embedded",
            help='base model with --adapter: "embedded" or a local checkpoint dir',
        )

    p = sub.add_parser("generate", help="sample text from base + adapter")
    with_adapter(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "export",
        help="write a plain peft adapter (checked by logits), or with --merge a merged model",
    )
    with_adapter(p)
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights")
    p.set_defaults(func=cmd_export)

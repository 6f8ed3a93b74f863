"""The enterprise side's commands: the node's own privacy ledger.

`fedmoe agent ledger FILE --json`: {"ledger": path, "entries": [...], "lifetime": {...}}
  entry (one per charge, in order): run_id (the coordinator's run number, as the coordinator
    named the run; null: not told), run_key (the node's key for the run), round, level
    ("record" | "enterprise"), epsilon (the run's epsilon at that level after the round; null:
    the run gives no guarantee at that level), delta, recorded_at (as the ledger stored it)
  lifetime: {"record": {"epsilon", "delta"}, "enterprise": {"epsilon", "delta"}}, across runs
    (basic composition; epsilon null: some run gave no guarantee at that level)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rich.table import Table

from fedmoe.cli.common import add_json_arg, console, print_json


def ledger_rows(ledger) -> dict:
    numbers = ledger.run_numbers()
    entries = [
        {
            "run_id": numbers.get(run.split(":")[0]),
            "run_key": run,
            "round": number,
            "level": level,
            "epsilon": eps if math.isfinite(eps) else None,
            "delta": delta,
            "recorded_at": at,
        }
        for run, number, level, eps, delta, at in ledger.entries()
    ]
    # Basic composition across runs: epsilons add up, and so do deltas.
    lifetime = {
        level: {"epsilon": ledger.lifetime(level), "delta": ledger.lifetime_delta(level)}
        for level in ("record", "enterprise")
    }
    return {"entries": entries, "lifetime": lifetime}


def cmd_ledger(args) -> int:
    from fedmoe.client.ledger import PrivacyLedger

    if not args.ledger.is_file():
        raise FileNotFoundError(f"no node ledger at {args.ledger}")
    rows = ledger_rows(PrivacyLedger(args.ledger))
    if args.json:
        print_json({"ledger": str(args.ledger), **rows})
        return 0
    table = Table(title=f"node ledger {args.ledger}")
    for col in ("run", "round", "level", "run epsilon after", "delta", "recorded"):
        table.add_column(col)
    for e in rows["entries"]:
        shown = "inf (no guarantee)" if e["epsilon"] is None else f"{e['epsilon']:.3f}"
        run = e["run_key"][:8] if e["run_id"] is None else f"{e['run_id']} ({e['run_key'][:8]})"
        table.add_row(
            run,
            str(e["round"]),
            e["level"],
            shown,
            f"{e['delta']:g}",
            e["recorded_at"][:19],
        )
    console.print(table)
    for level, total in rows["lifetime"].items():
        console.print(
            f"lifetime {level}-level: epsilon {total['epsilon']:.3f}, delta {total['delta']:.3g}",
            highlight=False,
        )
    return 0


def cmd_agent(args) -> int:
    from fedmoe.cli.common import UsageError
    from fedmoe.client.agent import Agent, agent_health
    from fedmoe.client.agent_config import load_agent_config

    if args.config is None:
        raise UsageError("--config agent.toml is required (see the README's deployment section)")
    config = load_agent_config(args.config)
    if args.agent_command == "health":
        ok, message = agent_health(config)
        console.print(message, highlight=False)
        return 0 if ok else 1
    from fedmoe.client.ledger_witness import LedgerRefused, create_ledger, open_ledger
    from fedmoe.support.files import ConfigError

    settings = config.node_settings()
    ledger, key, witness = settings.ledger_path, settings.identity_key, settings.witness_path
    try:
        if args.agent_command == "restore-ledger":
            from fedmoe.client.ledger_witness import restore_ledger

            for line in restore_ledger(ledger, key, witness):
                console.print(line, highlight=False)
            return 0
        only_make = args.agent_command == "new-ledger"
        made = (only_make or args.new_ledger) and not ledger.exists()
        if made:
            create_ledger(ledger, key, config.name, witness)
            console.print(f"made a new, empty ledger {ledger} for this node", highlight=False)
        # An existing ledger is checked, never replaced; refused here, before any process starts.
        checked = open_ledger(ledger, key, witness)
        if only_make:
            if not made:
                console.print(
                    f"this node's ledger {ledger} exists already ({checked.charges()} charges); "
                    "kept",
                    highlight=False,
                )
            return 0
    except LedgerRefused as err:
        raise ConfigError(f"ledger: {err}") from None
    return Agent(config).run()


def cmd_init(args) -> int:
    from fedmoe.client.keys import make_node_keys

    private, public, digest = make_node_keys(Path(args.dir), force=args.force)
    # Plain prints: a public key must not be wrapped at the terminal's width.
    print(f"wrote {private} (keep it on this node) and {public}")
    print(f"public key {digest}:\n{public.read_text().strip()}")
    print(
        f"send {public} to the platform admin: `fedmoe admin nodes register ENTERPRISE --public-key {public.name}`"
    )
    return 0


def add_commands(sub) -> None:
    agent = sub.add_parser(
        "agent", help="the enterprise agent: run a node, make its key, read its ledger"
    )
    agent.add_argument("--config", type=Path, help="agent.toml")
    agent.add_argument(
        "--new-ledger",
        action="store_true",
        help="make the node's ledger if it has none (refused where the node has spent before)",
    )
    agent_sub = agent.add_subparsers(dest="agent_command")
    agent.set_defaults(func=cmd_agent)
    p = agent_sub.add_parser(
        "init", help="make this node's key pair and print the public key to register"
    )
    p.add_argument("--dir", default="keys", help="where to write node.key and node.pub")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=cmd_init)
    p = agent_sub.add_parser("health", help="exit 0 if the agent configured by --config is up")
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="agent.toml")
    p = agent_sub.add_parser(
        "new-ledger",
        help="make the ledger of a node that never trained, and exit (refused once it has spent)",
    )
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="agent.toml")
    p = agent_sub.add_parser(
        "restore-ledger",
        help="accept a restored backup of this node's ledger; the spend it lacks is carried in",
    )
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="agent.toml")
    p = agent_sub.add_parser("ledger", help="show a node's own privacy ledger (its SQLite file)")
    p.add_argument("ledger", type=Path, metavar="FILE")
    add_json_arg(p, fields="fedmoe.cli.agent")
    p.set_defaults(func=cmd_ledger)

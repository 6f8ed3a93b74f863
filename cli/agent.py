"""The enterprise side's commands: the node's own privacy ledger."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from fedmoe.cli.common import console


def cmd_ledger(args) -> int:
    from fedmoe.client.ledger import PrivacyLedger

    if not args.ledger.is_file():
        raise FileNotFoundError(f"no node ledger at {args.ledger}")
    ledger = PrivacyLedger(args.ledger)
    table = Table(title=f"node ledger {args.ledger}")
    for col in ("run", "round", "level", "run epsilon after", "delta", "recorded"):
        table.add_column(col)
    for run, number, level, eps, delta, at in ledger.entries():
        shown = "inf (no guarantee)" if eps == float("inf") else f"{eps:.3f}"
        table.add_row(run, str(number), level, shown, f"{delta:g}", at[:19])
    console.print(table)
    for level in ("record", "enterprise"):
        # Basic composition across runs: epsilons add up, and so do deltas.
        console.print(
            f"lifetime {level}-level: epsilon {ledger.lifetime(level):.3f}, "
            f"delta {ledger.lifetime_delta(level):.3g}",
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
    p = agent_sub.add_parser("ledger", help="show a node's own privacy ledger (its SQLite file)")
    p.add_argument("ledger", type=Path, metavar="FILE")
    p.set_defaults(func=cmd_ledger)

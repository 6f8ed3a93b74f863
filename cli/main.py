"""The `fedmoe` command: one parser, each side's commands registered by its own module."""

from __future__ import annotations

import argparse
import sys

from rich.markup import escape

from fedmoe.cli import admin, agent, coordinator, model
from fedmoe.cli.common import UsageError, console
from fedmoe.support.processes import Stopped

COMMAND_MODULES = (coordinator, agent, admin, model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmoe",
        description="Federated, privacy-preserving LoRA fine-tuning of DeepSeek-style MoE models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedmoe.coordinator.db import DatabaseMissing
    from fedmoe.support.files import ConfigError

    args = build_parser().parse_args(argv)
    # Messages quote what the operator wrote (`[section]`, keys, paths): printed as text, not as
    # rich markup, where a `[/x]` in a config would end the command with a MarkupError.
    try:
        return args.func(args)
    except (ConfigError, UsageError, DatabaseMissing, FileNotFoundError, FileExistsError) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        return 2
    except LookupError as err:
        console.print(
            f"[red]error:[/red] {escape(str(err.args[0] if err.args else err))}", highlight=False
        )
        return 2
    except admin.AdminCallFailed as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        return 1
    except (KeyboardInterrupt, Stopped):
        console.print("interrupted", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())

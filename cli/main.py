"""The `fedmoe` command: one parser, each side's commands registered by its own module."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from rich.markup import escape

from fedmoe.cli import admin, agent, coordinator, model
from fedmoe.cli.common import UsageError, console, error_console
from fedmoe.support.processes import Stopped

COMMAND_MODULES = (coordinator, agent, admin, model)

# Third-party warnings that say nothing to a fedmoe user, each silenced by category, the module
# that warns and the start of its message, so that any other warning still shows.
NOISE = (
    # peft 0.21 asks transformers 5 for `is_gradient_checkpointing` on every adapter it builds.
    (FutureWarning, r"transformers\.modeling_utils", r"`is_gradient_checkpointing` is deprecated"),
)


def quiet_third_party_noise() -> None:
    """Filter the warnings in NOISE, and transformers' "Loading weights" progress bars (on every
    model load: `generate`, `export`, the coordinator's and agents' logs) unless the operator set
    HF_HUB_DISABLE_PROGRESS_BARS. The environment carries it to the processes a command starts."""
    for category, module, message in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("fedmoe")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmoe",
        description="Federated, privacy-preserving LoRA fine-tuning of DeepSeek-style MoE models.",
    )
    parser.add_argument("--version", action="version", version=f"fedmoe {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedmoe.coordinator.store.db import DatabaseMissing
    from fedmoe.support.files import ConfigError

    quiet_third_party_noise()
    args = build_parser().parse_args(argv)
    # Under --json, stdout carries the document or nothing: errors go to stderr.
    out = error_console if getattr(args, "json", False) else console
    # Messages quote what the operator wrote (`[section]`, keys, paths): printed as text, not as
    # rich markup, where a `[/x]` in a config would end the command with a MarkupError.
    try:
        return args.func(args)
    except (ConfigError, UsageError, DatabaseMissing, FileNotFoundError, FileExistsError) as err:
        out.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        return 2
    except LookupError as err:
        out.print(
            f"[red]error:[/red] {escape(str(err.args[0] if err.args else err))}", highlight=False
        )
        return 2
    except admin.AdminCallFailed as err:
        out.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        return 1
    except (KeyboardInterrupt, Stopped):
        out.print("interrupted", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())

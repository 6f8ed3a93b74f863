"""What every command module shares: the console, argument types, `--set` overrides, `--json`."""

from __future__ import annotations

import argparse
import json
import math
import sys

from rich.console import Console

# Tables stay readable when piped (rich would wrap them at 80 columns).
console = Console(width=None if sys.stdout.isatty() else 200)
# Errors under `--json`: stdout carries the JSON document or nothing.
error_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
DEFAULT_DB = "sqlite:///runs/fedmoe.db"


class UsageError(ValueError):
    """Bad command-line input; printed as `error: ...` with exit code 2."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_database_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--database",
        default=DEFAULT_DB,
        help=f"SQLAlchemy URL of the run database (default {DEFAULT_DB})",
    )


def add_set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )


def add_json_arg(p: argparse.ArgumentParser, fields: str = "fedmoe.cli.tables") -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help=f"print one JSON document instead of tables (its fields: `pydoc {fields}`)",
    )


def _finite(value):
    """JSON has no infinity or NaN: a non-finite number (no guarantee) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def print_json(document: dict) -> None:
    """One JSON document on stdout, nothing else (no rich markup, no wrapping)."""
    sys.stdout.write(json.dumps(_finite(document), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()

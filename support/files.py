"""Reading the TOML files an operator writes (run, coordinator and agent configs) the same way on
both sides: bounded in size, UTF-8, and every problem named by file and field."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pydantic import ValidationError

MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; anything near this is a mistake
# Lines of a validation report: a 1 MB config can hold 100,000s of wrong values, and a report
# of millions of lines helps no one (the count of the rest is still given).
MAX_REPORTED_PROBLEMS = 50


HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})$")


def check_host_port(value: str, example: str) -> str:
    """`value` if it is host:port with a port in 1..65535 (a pydantic validator's ValueError if
    not, showing `example`)."""
    match = HOST_PORT.match(value)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError(f"must be host:port, e.g. {example}")
    return value


class ConfigError(ValueError):
    """A config value outside its allowed range; the message names each field."""


def _toml_line(text: str, err: tomllib.TOMLDecodeError) -> str:
    """The offending line itself, and for a key given twice its name (tomllib names neither)."""
    match = re.search(r"line (\d+)", str(err))
    if not match:
        return ""
    lines = text.splitlines()
    number = int(match.group(1))
    if not 1 <= number <= len(lines):
        return ""
    line = lines[number - 1].strip()
    shown = f": line {number} reads {line[:120]!r}"
    if "overwrite" in str(err) or "declare" in str(err):
        key = re.split(r"\s*=", line.strip("[] "), maxsplit=1)[0].strip()
        shown += f"; {key[:80]!r} is defined twice"
    return shown


def parse_toml(text: str | bytes, source: str) -> dict:
    """TOML text (at most MAX_CONFIG_BYTES, UTF-8) as a dict, or a ConfigError."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{source}: {len(text)} bytes is too large for a config (at most {MAX_CONFIG_BYTES})"
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{source}: not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None
    if text.startswith(
        "\ufeff"
    ):  # tomllib's own message would be "Invalid statement (line 1, column 1)"
        raise ConfigError(f"{source}: starts with a byte-order mark; save it as UTF-8 without one")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML ({err}){_toml_line(text, err)}") from None
    except RecursionError:
        raise ConfigError(
            f"{source}: not a usable TOML document (arrays or tables nest too deeply)"
        ) from None
    except (
        ValueError
    ) as err:  # an integer too long for Python; its hint is for programmers, not config authors
        raise ConfigError(
            f"{source}: not a usable TOML document ({str(err).split('; use ')[0][:200]})"
        ) from None


def read_toml_file(path: Path) -> dict:
    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError(f"config file {str(path)[:200]} is a folder, not a TOML file")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)[:200]} does not exist")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: {size} bytes is too large for a config (at most {MAX_CONFIG_BYTES})"
            )
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file {str(path)[:200]}: {err.strerror or err}") from None
    return parse_toml(raw, str(path))


# A model validator's message that starts with `key: ` is about that key of the model it checks.
_NAMED_FIELD = re.compile(r"([a-z_][a-z0-9_.]*): ")


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `field.path: what is wrong (got value)`; at most MAX_REPORTED_PROBLEMS."""
    lines = [f"invalid {source}:"]
    for e in err.errors(include_url=False)[:MAX_REPORTED_PROBLEMS]:
        field = _field_name(e["loc"])
        shown = e.get("input")
        got = (
            f" (got {shown!r:.80})"
            if e["type"] != "missing" and not isinstance(shown, dict)
            else ""
        )
        msg = (
            "unknown key; remove it or check its spelling"
            if e["type"] == "extra_forbidden"
            else e["msg"]
        )
        if e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            if named := _NAMED_FIELD.match(msg):
                field = named[1] if field == "(top level)" else f"{field}.{named[1]}"
                msg = msg[named.end() :]
        lines.append(f"  {field}: {msg}{got}")
    if err.error_count() > MAX_REPORTED_PROBLEMS:
        lines.append(f"  ... and {err.error_count() - MAX_REPORTED_PROBLEMS:,} more problems")
    return "\n".join(lines)


def _field_name(loc: tuple) -> str:
    """`section.key.0.key`; a key an operator cannot have meant (control characters, thousands of
    characters) is shown escaped and cut, never passed raw to a terminal."""
    name = ".".join(str(p) if str(p).isprintable() else repr(str(p)) for p in loc) or "(top level)"
    return name if len(name) <= 200 else f"{name[:200]}..."


def resolve_path(path: str | Path, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


# Free space a run's storage must have when the run is created; each round then checks room for
# two of its own checkpoints before any node is asked.
MIN_FREE_BYTES = 64 << 20


def unwritable(directory: Path, room: int = 0) -> str | None:
    """Why files cannot be written into `directory` now (made if missing), with `room` bytes
    free, or None."""
    import shutil
    import tempfile

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
        free = shutil.disk_usage(directory).free
    except OSError as err:
        return f"cannot write to {str(directory)[:200]} ({err.strerror or err})"
    if free < room:
        return f"{str(directory)[:200]} has {free:,} bytes free, {room:,} needed"
    return None
